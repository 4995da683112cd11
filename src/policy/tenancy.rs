//! What an API key is given: `[tiers.NAME]` terms, `[keys.NAME]` terms over
//! them, and the plan each combination of the two resolves to.
//!
//! A key's tier comes from the keys file (`hyperion keys add --tier`),
//! which changes without a reload; its `[keys.NAME]` terms come from the
//! policy. So every combination (no tier or each tier, no terms of its own
//! or each key's) is resolved here once, when the policy is read, and a
//! request only looks its plan up. A key without a tier, or with one the
//! policy does not define, has the `default` tier when there is one.
//!
//! The request and token budgets become rate limiters keyed by the tenant
//! (`tier.NAME.rate`, `key.NAME.tokens_per_day`), listed with the others in
//! `rate_limits` so that they show on the admin API, keep their buckets
//! across reloads and are the fleet's with a shared tier.
//!
//! Owns the resolution, not the counting (`limits`) nor the line (`limits::
//! fair_line`).

use std::sync::Arc;
use std::time::Duration;

use super::units::Rate;
use super::{LimitKey, LimitUnit, Priority, RateLimitPolicy, WhenAbsent};

/// The terms of a tier, or those a key sets over its tier's (unset: the
/// tier's, or the default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierTerms {
    /// Requests per period, per key.
    pub rate: Option<Rate>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    /// Requests of one key in progress at once.
    pub max_concurrent: Option<u32>,
    /// The class its requests wait in for a busy upstream.
    pub priority: Option<Priority>,
    /// The highest class a request may ask for (`X-Hyperion-Priority`).
    pub max_priority: Option<Priority>,
    /// Requests started per turn in the line.
    pub weight: Option<u32>,
    /// Requests waiting at once; unset: the upstream's
    /// `max_queued_per_tenant`.
    pub max_queued: Option<u32>,
}

/// What a key gets, resolved.
#[derive(Debug, PartialEq)]
pub struct TenantPlan {
    /// Its place in `Tenancy::plans` (routes keep their limiters by it).
    pub index: usize,
    /// The budgets' limiters, in `rate_limits`.
    pub limiters: Vec<Arc<RateLimitPolicy>>,
    pub max_concurrent: Option<u32>,
    pub priority: Priority,
    pub max_priority: Priority,
    pub weight: u32,
    pub max_queued: Option<u32>,
}

/// Every plan a key can have.
#[derive(Debug, Default, PartialEq)]
pub struct Tenancy {
    /// `[tiers.NAME]` names, sorted.
    pub tiers: Vec<String>,
    /// `[keys.NAME]` names, sorted.
    pub keys: Vec<String>,
    /// By (tier, key terms): index `t * (keys + 1) + k`, where `t` and `k`
    /// are 0 for none and 1 + the index in `tiers` and `keys` otherwise.
    /// Empty when the policy has neither.
    pub plans: Vec<Arc<TenantPlan>>,
}

/// The budgets a tier or key sets, by field name.
const BUDGETS: [&str; 3] = ["rate", "tokens_per_minute", "tokens_per_day"];

impl TierTerms {
    fn budget(&self, field: &str) -> Option<(LimitUnit, Rate)> {
        let tokens = |count: u64, per: u64| {
            (
                // A request naming no max_tokens reserves this much until
                // its answer's usage settles it.
                LimitUnit::Tokens {
                    default_tokens: 1024,
                },
                Rate {
                    count,
                    per: Duration::from_secs(per),
                },
            )
        };
        match field {
            "rate" => self.rate.map(|r| (LimitUnit::Requests, r)),
            "tokens_per_minute" => self.tokens_per_minute.map(|n| tokens(n, 60)),
            "tokens_per_day" => self.tokens_per_day.map(|n| tokens(n, 86_400)),
            _ => None,
        }
    }
}

impl Tenancy {
    /// Resolves every combination; returns it with the budget limiters
    /// to add to `rate_limits`.
    pub fn resolve(
        tiers: Vec<(String, TierTerms)>,
        keys: Vec<(String, TierTerms)>,
    ) -> (Tenancy, Vec<Arc<RateLimitPolicy>>) {
        if tiers.is_empty() && keys.is_empty() {
            return (Tenancy::default(), Vec::new());
        }
        let mut limiters = Vec::new();
        let mut make = |owner: &str, name: &str, terms: &TierTerms| {
            BUDGETS.map(|field| {
                terms.budget(field).map(|(unit, rate)| {
                    let limiter = Arc::new(RateLimitPolicy {
                        name: format!("{owner}.{name}.{field}"),
                        key: LimitKey::Tenant,
                        unit,
                        rate,
                        // A budget may be spent at once.
                        burst: rate.count,
                        // The cache's answers cost the backend nothing.
                        count_hits: false,
                        max_keys: 100_000,
                        when_absent: WhenAbsent::ClientIp,
                    });
                    limiters.push(limiter.clone());
                    limiter
                })
            })
        };
        let tier_limiters: Vec<_> = tiers.iter().map(|(n, t)| make("tier", n, t)).collect();
        let key_limiters: Vec<_> = keys.iter().map(|(n, t)| make("key", n, t)).collect();
        let none = TierTerms::default();
        let no_limiters: [Option<Arc<RateLimitPolicy>>; 3] = [None, None, None];
        let mut plans = Vec::with_capacity((tiers.len() + 1) * (keys.len() + 1));
        for t in 0..=tiers.len() {
            let (tier, tier_lims) = match t {
                0 => (&none, &no_limiters),
                _ => (&tiers[t - 1].1, &tier_limiters[t - 1]),
            };
            for k in 0..=keys.len() {
                let (own, own_lims) = match k {
                    0 => (&none, &no_limiters),
                    _ => (&keys[k - 1].1, &key_limiters[k - 1]),
                };
                let priority = own.priority.or(tier.priority).unwrap_or(Priority::Standard);
                plans.push(Arc::new(TenantPlan {
                    index: plans.len(),
                    limiters: (0..BUDGETS.len())
                        .filter_map(|i| own_lims[i].clone().or_else(|| tier_lims[i].clone()))
                        .collect(),
                    max_concurrent: own.max_concurrent.or(tier.max_concurrent),
                    priority,
                    // Never below the class it starts in.
                    max_priority: own
                        .max_priority
                        .or(tier.max_priority)
                        .unwrap_or(priority)
                        .min(priority),
                    weight: own.weight.or(tier.weight).unwrap_or(1),
                    max_queued: own.max_queued.or(tier.max_queued),
                }));
            }
        }
        let tenancy = Tenancy {
            tiers: tiers.into_iter().map(|(n, _)| n).collect(),
            keys: keys.into_iter().map(|(n, _)| n).collect(),
            plans,
        };
        (tenancy, limiters)
    }

    /// The plan of key `name` of tier `tier` (the `default` tier when it
    /// has none, or one the policy does not define); `None` when the
    /// policy has no tiers and no key terms.
    pub fn plan(&self, name: &str, tier: Option<&str>) -> Option<&Arc<TenantPlan>> {
        if self.plans.is_empty() {
            return None;
        }
        let find = |list: &[String], n: &str| list.binary_search_by(|x| x.as_str().cmp(n)).ok();
        let t = tier
            .and_then(|t| find(&self.tiers, t))
            .or_else(|| find(&self.tiers, "default"))
            .map_or(0, |i| i + 1);
        let k = find(&self.keys, name).map_or(0, |i| i + 1);
        self.plans.get(t * (self.keys.len() + 1) + k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_terms_go_over_its_tiers_and_unknown_tiers_are_the_default() {
        let tier = |weight, tokens| TierTerms {
            weight: Some(weight),
            tokens_per_day: Some(tokens),
            priority: Some(Priority::Batch),
            ..TierTerms::default()
        };
        let (t, limiters) = Tenancy::resolve(
            vec![
                ("default".into(), tier(1, 1000)),
                ("pro".into(), tier(4, 9000)),
            ],
            vec![(
                "alice".into(),
                TierTerms {
                    tokens_per_day: Some(50),
                    max_priority: Some(Priority::Interactive),
                    ..TierTerms::default()
                },
            )],
        );
        assert_eq!(limiters.len(), 3);
        let alice = t.plan("alice", Some("pro")).unwrap();
        assert_eq!(alice.weight, 4, "from the tier");
        assert_eq!(alice.limiters[0].name, "key.alice.tokens_per_day");
        assert_eq!(alice.max_priority, Priority::Interactive);
        let bob = t.plan("bob", Some("gone")).unwrap();
        assert_eq!(bob.limiters[0].name, "tier.default.tokens_per_day");
        assert_eq!(
            bob.max_priority,
            Priority::Batch,
            "no higher than its class"
        );
        assert_eq!(t.plan("carol", None).unwrap().index, bob.index);
        assert!(Tenancy::default().plan("x", None).is_none());
    }
}
