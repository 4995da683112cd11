//! Validation of `[rate_limits.NAME]`.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules.

use super::*;

impl Validator<'_> {
    pub(super) fn rate_limit(
        &self,
        name: String,
        raw: Spanned<raw::RawRateLimit>,
        auth_on: bool,
    ) -> Result<RateLimitPolicy, PolicyError> {
        let k = |f: &str| format!("rate_limits.{name}.{f}");
        let span = raw.span();
        if name.contains('.') {
            return Err(self.err(
                span,
                format!("rate_limits.{name}"),
                "a limiter's name cannot hold a dot (tiers' budgets are named tier.NAME.FIELD)",
                "name it with letters, digits, - and _",
            ));
        }
        let raw = raw.into_inner();
        let Some(key_raw) = raw.key else {
            return Err(self.err(
                span,
                format!("rate_limits.{name}"),
                "no `key`: what the buckets are counted by",
                "add key = \"client_ip\" (or \"header:<name>\", \"route\", \"global\")",
            ));
        };
        let key = match key_raw.get_ref().as_str() {
            "client_ip" => LimitKey::ClientIp,
            "tenant" if !auth_on => {
                return Err(self.err(
                    key_raw.span(),
                    k("key"),
                    "there is no [auth]: no request would carry a key to count by",
                    "add [auth] with keys_file (see docs/policy.md), or key by \"client_ip\"",
                ))
            }
            "tenant" => LimitKey::Tenant,
            "route" => LimitKey::Route,
            "global" => LimitKey::Global,
            other => match other.strip_prefix("header:") {
                Some(h) => match http::HeaderName::from_bytes(h.trim().as_bytes()) {
                    Ok(h) => LimitKey::Header(h),
                    Err(_) => return Err(self.err(
                        key_raw.span(),
                        k("key"),
                        format!("`{h}` is not a header name"),
                        "write the header's name after `header:`, e.g. \"header:authorization\"",
                    )),
                },
                None => {
                    return Err(self.err(
                        key_raw.span(),
                        k("key"),
                        format!("unknown key `{other}`"),
                        "use \"client_ip\", \"header:<name>\", \"tenant\", \"route\" or \"global\"",
                    ))
                }
            },
        };
        let (unit, rate) = match (raw.rate, raw.tokens) {
            (Some(rate), None) => {
                if let Some(d) = &raw.default_tokens {
                    return Err(self.err(
                        d.span(),
                        k("default_tokens"),
                        "`default_tokens` only applies to a `tokens` limit",
                        "remove it, or count tokens with tokens = \"N/period\" instead of `rate`",
                    ));
                }
                (LimitUnit::Requests, rate.into_inner())
            }
            (None, Some(tokens)) => {
                let default_tokens = match raw.default_tokens {
                    Some(d) if *d.get_ref() == 0 => {
                        return Err(self.err(
                            d.span(),
                            k("default_tokens"),
                            "a request reserves at least one token",
                            "use a typical answer's size, e.g. default_tokens = 1024",
                        ))
                    }
                    Some(d) => d.into_inner(),
                    None => 1024,
                };
                (LimitUnit::Tokens { default_tokens }, tokens.into_inner())
            }
            (Some(rate), Some(_)) => {
                return Err(self.err(
                    rate.span(),
                    format!("rate_limits.{name}"),
                    "both `rate` (requests) and `tokens` are set",
                    "a limiter counts one thing: define two limiters and name both in the route's rate_limit",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    span,
                    format!("rate_limits.{name}"),
                    "neither `rate` nor `tokens` is set",
                    "add rate = \"60/min\" (requests) or tokens = \"100000/hour\" (LLM tokens)",
                ))
            }
        };
        let burst = match raw.burst {
            Some(b) if *b.get_ref() == 0 => {
                return Err(self.err(
                    b.span(),
                    k("burst"),
                    "a burst of 0 allows nothing",
                    "use 1 or more (the default is the rate's count)",
                ))
            }
            Some(b) => b.into_inner(),
            None => rate.count,
        };
        let max_keys = match raw.max_keys {
            Some(m) if *m.get_ref() == 0 => {
                return Err(self.err(
                    m.span(),
                    k("max_keys"),
                    "0 keys cannot track anybody",
                    "use 1 or more (the default is 100000)",
                ))
            }
            Some(m) => m.into_inner(),
            None => 100_000,
        };
        let when_absent = match &raw.when_absent {
            Some(w) if !matches!(key, LimitKey::Header(_) | LimitKey::Tenant) => {
                return Err(self.err(
                    w.span(),
                    k("when_absent"),
                    "only a header or tenant key can be absent",
                    "remove when_absent, or key by \"header:<name>\" or \"tenant\"",
                ))
            }
            Some(w) => *w.get_ref(),
            None => WhenAbsent::ClientIp,
        };
        Ok(RateLimitPolicy {
            when_absent,
            name,
            key,
            unit,
            rate,
            burst,
            count_hits: raw.count_hits.unwrap_or(false),
            max_keys,
        })
    }
}
