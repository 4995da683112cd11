//! Validation of `[tiers.NAME]` and `[keys.NAME]`.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules. What they resolve to is `tenancy.rs`'s.

use super::*;
use crate::policy::tenancy::TierTerms;

/// A turn of more than this many requests is no longer a share.
const MAX_WEIGHT: u32 = 1000;

impl Validator<'_> {
    /// One table's terms; `table` is `tiers` or `keys`.
    pub(super) fn tier_terms(
        &self,
        table: &str,
        name: &str,
        raw: Spanned<raw::RawTier>,
        auth_on: bool,
    ) -> Result<TierTerms, PolicyError> {
        let k = |f: &str| format!("{table}.{name}.{f}");
        if !auth_on {
            return Err(self.err(
                raw.span(),
                format!("{table}.{name}"),
                "there is no [auth]: no request would carry a key to give these terms to",
                "add [auth] with keys_file (see docs/policy.md), or remove the table",
            ));
        }
        let raw = raw.into_inner();
        let positive = |v: &Option<Spanned<u64>>, field: &str, fix: &str| match v {
            Some(v) if *v.get_ref() == 0 => {
                Err(self.err(v.span(), k(field), "0 allows nothing", fix.to_owned()))
            }
            Some(v) => Ok(Some(*v.get_ref())),
            None => Ok(None),
        };
        let widen = |v: &Option<Spanned<u32>>| {
            v.as_ref()
                .map(|v| Spanned::new(v.span(), u64::from(*v.get_ref())))
        };
        let tokens_per_minute = positive(
            &raw.tokens_per_minute,
            "tokens_per_minute",
            "use 1 or more, or remove the key for no per-minute budget",
        )?;
        let tokens_per_day = positive(
            &raw.tokens_per_day,
            "tokens_per_day",
            "use 1 or more, or remove the key for no daily budget",
        )?;
        let max_concurrent = positive(
            &widen(&raw.max_concurrent),
            "max_concurrent",
            "use 1 or more, or remove the key for no limit",
        )?;
        let max_queued = positive(
            &widen(&raw.max_queued),
            "max_queued",
            "use 1 or more, or remove the key for the upstream's max_queued_per_tenant",
        )?;
        let weight = match &raw.weight {
            Some(w) if *w.get_ref() == 0 || *w.get_ref() > MAX_WEIGHT => {
                return Err(self.err(
                    w.span(),
                    k("weight"),
                    format!("a weight of {} is outside 1–{MAX_WEIGHT}", w.get_ref()),
                    "give each tier its share in requests per turn, e.g. 1 for free, 4 for pro",
                ))
            }
            Some(w) => Some(*w.get_ref()),
            None => None,
        };
        if let Some(r) = &raw.rate {
            if r.get_ref().count == 0 {
                return Err(self.err(
                    r.span(),
                    k("rate"),
                    "0 requests allows nothing",
                    "use a rate such as \"60/min\", or remove the key for no request limit",
                ));
            }
        }
        let priority = raw.priority.as_ref().map(|p| *p.get_ref());
        let max_priority = raw.max_priority.as_ref().map(|p| *p.get_ref());
        if let (Some(p), Some(m)) = (priority, &raw.max_priority) {
            if *m.get_ref() > p {
                return Err(self.err(
                    m.span(),
                    k("max_priority"),
                    format!(
                        "`{}` is below the tier's own priority `{}`",
                        m.get_ref().as_str(),
                        p.as_str()
                    ),
                    "max_priority is the highest class a request may ask for: the same as priority or higher",
                ));
            }
        }
        Ok(TierTerms {
            rate: raw.rate.map(Spanned::into_inner),
            tokens_per_minute,
            tokens_per_day,
            max_concurrent: max_concurrent.map(|n| n as u32),
            priority,
            max_priority,
            weight,
            max_queued: max_queued.map(|n| n as u32),
        })
    }
}
