//! Validation of `[[route]]`: matching, header rewrites, and which upstream and limiters each route names.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules.

use super::*;

/// Finds the pool an upstream name (in the field named) refers to.
type Resolve<'f, 'u> =
    dyn Fn(&Spanned<String>, &str) -> Result<&'u UpstreamPolicy, PolicyError> + 'f;

/// Headers one route's `match` may ask for.
const MAX_MATCH_HEADERS: usize = 16;
/// Arms of one `split`, and the largest weight of one.
const MAX_SPLIT_ARMS: usize = 16;
const MAX_SPLIT_WEIGHT: u32 = 1_000_000;

impl Validator<'_> {
    /// `[route.headers]`: names and values checked once, here.
    pub(super) fn route_headers(
        &self,
        raw: Spanned<raw::RawRouteHeaders>,
        route_key: &str,
    ) -> Result<HeaderRewrite, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let key = |field: &str| format!("{route_key}.headers.{field}");
        let name = |field: &str, n: &str| -> Result<http::HeaderName, PolicyError> {
            let parsed = http::HeaderName::from_bytes(n.trim().as_bytes()).map_err(|_| {
                self.err(
                    span.clone(),
                    key(field),
                    format!("`{n}` is not a header name"),
                    "use letters, digits and `-`, e.g. \"X-Served-By\"",
                )
            })?;
            if !crate::headers::rewritable(&parsed) {
                return Err(self.err(
                    span.clone(),
                    key(field),
                    format!("`{n}` cannot be rewritten: Hyperion frames messages and manages connections and encodings itself"),
                    "remove it from the list",
                ));
            }
            Ok(parsed)
        };
        let set = |field: &str,
                   map: Option<std::collections::BTreeMap<String, String>>|
         -> Result<Vec<(http::HeaderName, http::HeaderValue)>, PolicyError> {
            let mut out = Vec::new();
            for (n, v) in map.unwrap_or_default() {
                let value = http::HeaderValue::from_str(&v).map_err(|_| {
                    self.err(
                        span.clone(),
                        key(field),
                        format!("the value of `{n}` is not a valid header value"),
                        "use visible ASCII characters and spaces, no line breaks",
                    )
                })?;
                out.push((name(field, &n)?, value));
            }
            Ok(out)
        };
        let remove = |field: &str, list: Option<Vec<String>>| {
            list.unwrap_or_default()
                .iter()
                .map(|n| name(field, n))
                .collect::<Result<Vec<_>, _>>()
        };
        let rewrite = HeaderRewrite {
            request_set: set("request_set", raw.request_set)?,
            request_remove: remove("request_remove", raw.request_remove)?,
            response_set: set("response_set", raw.response_set)?,
            response_remove: remove("response_remove", raw.response_remove)?,
        };
        for (field, sets, removes) in [
            ("request", &rewrite.request_set, &rewrite.request_remove),
            ("response", &rewrite.response_set, &rewrite.response_remove),
        ] {
            if let Some((n, _)) = sets.iter().find(|(n, _)| removes.contains(n)) {
                return Err(self.err(
                    span.clone(),
                    key(&format!("{field}_remove")),
                    format!("`{n}` is both set and removed"),
                    format!("keep it in only one of {field}_set and {field}_remove"),
                ));
            }
        }
        Ok(rewrite)
    }

    pub(super) fn routes(
        &self,
        raw: Vec<Spanned<raw::RawRoute>>,
        upstreams: &[Arc<UpstreamPolicy>],
        cache: &CachePolicy,
        rate_limits: &[Arc<RateLimitPolicy>],
        (compression_on, auth_on): (bool, bool),
    ) -> Result<Vec<Arc<RoutePolicy>>, PolicyError> {
        if raw.is_empty() {
            return Err(self.src.error(
                None,
                "route",
                "no routes: every request would get 404",
                "add a [[route]] with a name and an upstream (see the shipped proxy.toml)",
            ));
        }
        let upstream_names: Vec<String> = upstreams.iter().map(|u| u.name.clone()).collect();
        let mut routes: Vec<(Range<usize>, Arc<RoutePolicy>)> = Vec::with_capacity(raw.len());
        for (i, spanned) in raw.into_iter().enumerate() {
            let route_span = spanned.span();
            let r = spanned.into_inner();
            let key = format!("route[{i}]");
            let name = r.name.get_ref().trim().to_owned();
            if name.is_empty() {
                return Err(self.err(
                    r.name.span(),
                    format!("{key}.name"),
                    "empty route name",
                    "give the route a short name, e.g. name = \"generate\"",
                ));
            }
            if routes.iter().any(|(_, p)| p.name == name) {
                return Err(self.err(
                    r.name.span(),
                    format!("{key}.name"),
                    format!("route name `{name}` is used twice"),
                    "give each route its own name",
                ));
            }
            let key = format!("route[{i}] ({name})");
            let mut limits: Vec<Arc<RateLimitPolicy>> = Vec::new();
            for n in r.rate_limit.map(|v| v.into_inner()).unwrap_or_default() {
                let Some(found) = rate_limits.iter().find(|l| l.name == *n.get_ref()) else {
                    let names: Vec<String> = rate_limits.iter().map(|l| l.name.clone()).collect();
                    let fix = match nearest(n.get_ref(), &names) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None if names.is_empty() => {
                            "define it first, e.g. [rate_limits.per_ip] key = \"client_ip\" rate = \"60/min\"".into()
                        }
                        None => format!("use one of: {}", names.join(", ")),
                    };
                    return Err(self.err(
                        n.span(),
                        format!("{key}.rate_limit"),
                        format!("no rate limit is named `{}`", n.get_ref()),
                        fix,
                    ));
                };
                if limits.iter().any(|l| l.name == found.name) {
                    return Err(self.err(
                        n.span(),
                        format!("{key}.rate_limit"),
                        format!("`{}` is named twice", found.name),
                        "name each limiter once",
                    ));
                }
                limits.push(found.clone());
            }
            let headers = match r.headers {
                Some(h) => Some(Arc::new(self.route_headers(h, &key)?)),
                None => None,
            };
            let auth = match &r.auth {
                Some(a) if !auth_on => {
                    return Err(self.err(
                        a.span(),
                        format!("{key}.auth"),
                        "there is no [auth] to check keys against",
                        "add [auth] with keys_file = \"keys.toml\" (see docs/policy.md), or remove auth",
                    ))
                }
                Some(a) => *a.get_ref(),
                None if auth_on => AuthMode::Required,
                None => AuthMode::Off,
            };
            let deny = r.deny.as_ref().is_some_and(|d| *d.get_ref());
            if deny {
                let forwarding = [
                    (r.upstream.as_ref().map(|u| u.span()), "upstream"),
                    (r.split.as_ref().map(|u| u.span()), "split"),
                    (r.split_by.as_ref().map(|u| u.span()), "split_by"),
                    (r.cache.as_ref().map(|c| c.span()), "cache"),
                    (r.unknown_model.as_ref().map(|u| u.span()), "unknown_model"),
                ];
                if let Some((Some(span), what)) = forwarding.into_iter().find(|(s, _)| s.is_some())
                {
                    return Err(self.err(
                        span,
                        format!("{key}.{what}"),
                        "a route with deny = true forwards nothing",
                        format!("remove {what}, or remove deny to forward this route"),
                    ));
                }
                let matcher = self.route_matcher(r.matcher, &routes, &route_span, &key)?;
                routes.push((
                    route_span,
                    Arc::new(RoutePolicy {
                        name,
                        matcher,
                        upstream: String::new(),
                        split: Vec::new(),
                        split_by: SplitBy::Client,
                        deny: true,
                        preserve_host: true,
                        cache: None,
                        headers,
                        rate_limits: limits,
                        unknown_model: UnknownModel::Reject,
                        auth,
                    }),
                ));
                continue;
            }
            // The pool a name (at `span`, under `field`) refers to.
            let resolve =
                |name: &Spanned<String>, field: &str| -> Result<&UpstreamPolicy, PolicyError> {
                    let upstream = name.get_ref();
                    if let Some(pool) = upstreams.iter().find(|u| u.name == *upstream) {
                        return Ok(&**pool);
                    }
                    let fix = match nearest(upstream, &upstream_names) {
                        Some(best) => format!(
                            "did you mean `{best}`? (defined: {})",
                            upstream_names.join(", ")
                        ),
                        None if upstream_names.is_empty() => {
                            format!("define it with [upstreams.{upstream}] and servers = [...]")
                        }
                        None => format!("use one of: {}", upstream_names.join(", ")),
                    };
                    Err(self.err(
                        name.span(),
                        format!("{key}.{field}"),
                        format!("no upstream named `{upstream}`"),
                        fix,
                    ))
                };
            let (pools, split, split_by) = match (r.upstream, r.split) {
                (Some(u), Some(_)) => {
                    return Err(self.err(
                        u.span(),
                        format!("{key}.upstream"),
                        "a route with split names its upstreams in split",
                        "remove upstream (put it in split with its weight), or remove split",
                    ))
                }
                (None, None) => {
                    return Err(self.err(
                        route_span,
                        format!("{key}.upstream"),
                        "the route names no upstream",
                        "add upstream = \"<name of an [upstreams.*] table>\", or deny = true to answer 403",
                    ))
                }
                (Some(u), None) => {
                    if let Some(by) = &r.split_by {
                        return Err(self.err(
                            by.span(),
                            format!("{key}.split_by"),
                            "split_by is read only with split",
                            "add split = [{ upstream = \"…\", weight = … }, …], or remove split_by",
                        ));
                    }
                    (vec![resolve(&u, "upstream")?], Vec::new(), SplitBy::Client)
                }
                (None, Some(arms)) => {
                    let (pools, split) = self.split_arms(arms, &key, &resolve)?;
                    let by = match &r.split_by {
                        None => SplitBy::Client,
                        Some(b) => match b.get_ref().trim() {
                            "client" => SplitBy::Client,
                            other => match header_ref(other) {
                                Some(n) => SplitBy::Header(n),
                                _ => {
                                    return Err(self.err(
                                        b.span(),
                                        format!("{key}.split_by"),
                                        format!("`{other}` names nothing to keep a client's requests together by"),
                                        "use \"client\" (the default: its API key, else its address) or \"header:<name>\", e.g. \"header:x-session-id\"",
                                    ))
                                }
                            },
                        },
                    };
                    (pools, split, by)
                }
            };
            let pool = pools[0];
            let upstream = pool.name.clone();
            // A split route's cache waits as long as its slowest arm.
            let response_timeout = pools
                .iter()
                .map(|p| p.response_timeout)
                .max()
                .unwrap_or(pool.response_timeout);
            let unknown_model = match &r.unknown_model {
                Some(u) => {
                    if let Some(p) = pools.iter().find(|p| p.model_routing == ModelRouting::Off) {
                        let name = &p.name;
                        return Err(self.err(
                            u.span(),
                            format!("{key}.unknown_model"),
                            format!("upstream `{name}` does not route by model"),
                            format!(
                                "set model_routing on [upstreams.{name}], or remove unknown_model"
                            ),
                        ));
                    }
                    *u.get_ref()
                }
                None => UnknownModel::Reject,
            };
            // Whether this route's answers are read here (compressed, or
            // their tokens counted): then the upstream is asked for identity,
            // else the client's Accept-Encoding goes up and is keyed.
            let reads_answers = compression_on
                || limits
                    .iter()
                    .any(|l| matches!(l.unit, LimitUnit::Tokens { .. }));
            let route_cache = match r.cache {
                Some(c) => self
                    .route_cache(c, &key, cache, response_timeout)?
                    .map(|mut c| {
                        c.keys_accept_encoding = !reads_answers;
                        Arc::new(c)
                    }),
                None => None,
            };
            let matcher = self.route_matcher(r.matcher, &routes, &route_span, &key)?;
            routes.push((
                route_span,
                Arc::new(RoutePolicy {
                    name,
                    matcher,
                    upstream,
                    split,
                    split_by,
                    deny: false,
                    preserve_host: r.preserve_host.unwrap_or(true),
                    cache: route_cache,
                    headers,
                    rate_limits: limits,
                    unknown_model,
                    auth,
                }),
            ));
        }
        Ok(routes.into_iter().map(|(_, r)| r).collect())
    }

    /// A route's `match` (everything when absent); an error when a route
    /// before it matches everything it does.
    pub(super) fn route_matcher(
        &self,
        raw: Option<Spanned<raw::RawMatch>>,
        routes: &[(Range<usize>, Arc<RoutePolicy>)],
        route_span: &Range<usize>,
        key: &str,
    ) -> Result<RouteMatch, PolicyError> {
        let (matcher, match_span) = match raw {
            Some(m) => {
                let span = m.span();
                (self.route_match(m.into_inner(), key)?, span)
            }
            None => (RouteMatch::default(), route_span.clone()),
        };
        if let Some((earlier_span, earlier)) =
            routes.iter().find(|(_, e)| e.matcher.covers(&matcher))
        {
            let earlier_line = self.line_of(earlier_span);
            return Err(self.err(
                match_span,
                format!("{key}.match"),
                format!("this route can never match: route `{}` (line {earlier_line}) comes first and matches everything it does", earlier.name),
                format!("move it above `{}` or narrow that route's match", earlier.name),
            ));
        }
        Ok(matcher)
    }

    pub(super) fn route_match(
        &self,
        raw: raw::RawMatch,
        key: &str,
    ) -> Result<RouteMatch, PolicyError> {
        let methods = match raw.methods {
            None => None,
            Some(list) if list.is_empty() => None,
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for m in list {
                    let upper = m.get_ref().trim().to_ascii_uppercase();
                    let method = Method::from_bytes(upper.as_bytes())
                        .ok()
                        .filter(|_| !upper.is_empty())
                        .ok_or_else(|| {
                            self.err(
                                m.span(),
                                format!("{key}.match.methods"),
                                format!("`{}` is not an HTTP method", m.get_ref()),
                                "use method names such as \"GET\", \"POST\"",
                            )
                        })?;
                    out.push(method);
                }
                Some(out)
            }
        };
        let mut paths = Vec::new();
        for p in raw.paths.unwrap_or_default() {
            if !p.get_ref().starts_with('/') {
                return Err(self.err(
                    p.span(),
                    format!("{key}.match.paths"),
                    format!("`{}` does not start with /", p.get_ref()),
                    "write absolute paths such as \"/api/generate\"",
                ));
            }
            paths.push(p.into_inner());
        }
        let path_prefix = match raw.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(self.err(
                    p.span(),
                    format!("{key}.match.path_prefix"),
                    format!("`{}` does not start with /", p.get_ref()),
                    "write an absolute prefix such as \"/api/\"",
                ));
            }
            Some(p) => Some(p.into_inner()),
            None => None,
        };
        let host = match raw.host {
            Some(h) => Some(self.host_pattern(&h, key)?),
            None => None,
        };
        let mut headers = Vec::new();
        if let Some(table) = raw.headers {
            let span = table.span();
            let table = table.into_inner();
            if table.len() > MAX_MATCH_HEADERS {
                return Err(self.err(
                    span,
                    format!("{key}.match.headers"),
                    format!("{} headers; at most {MAX_MATCH_HEADERS}", table.len()),
                    "match on fewer headers, or split the route",
                ));
            }
            for (name, value) in table {
                let field = format!("{key}.match.headers");
                let parsed =
                    http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                        self.err(
                            value.span(),
                            field.clone(),
                            format!("`{name}` is not a header name"),
                            "use letters, digits and `-`, e.g. \"X-Canary\"",
                        )
                    })?;
                let wanted = match value.get_ref().as_str() {
                    "*" => None,
                    v => Some(http::HeaderValue::from_str(v).map_err(|_| {
                        self.err(
                            value.span(),
                            field.clone(),
                            format!("`{v}` cannot be a header's value"),
                            "use visible ASCII, or \"*\" for any value",
                        )
                    })?),
                };
                headers.push((parsed, wanted));
            }
        }
        Ok(RouteMatch {
            methods,
            paths,
            path_prefix,
            host,
            headers,
        })
    }

    /// A route's `split`: each arm an upstream named once, the weights
    /// summing to more than 0.
    fn split_arms<'u>(
        &self,
        raw: Spanned<Vec<Spanned<raw::RawSplitArm>>>,
        key: &str,
        resolve: &Resolve<'_, 'u>,
    ) -> Result<(Vec<&'u UpstreamPolicy>, Vec<SplitArm>), PolicyError> {
        let span = raw.span();
        let arms = raw.into_inner();
        let field = format!("{key}.split");
        if arms.len() < 2 || arms.len() > MAX_SPLIT_ARMS {
            return Err(self.err(
                span,
                field,
                format!("{} arms; a split has 2 to {MAX_SPLIT_ARMS}", arms.len()),
                "list each upstream with its weight: split = [{ upstream = \"stable\", weight = 95 }, { upstream = \"canary\", weight = 5 }]",
            ));
        }
        let mut pools: Vec<&UpstreamPolicy> = Vec::new();
        let mut split = Vec::new();
        for arm in arms {
            let arm = arm.into_inner();
            let pool = resolve(&arm.upstream, "split")?;
            if pools.iter().any(|p| p.name == pool.name) {
                return Err(self.err(
                    arm.upstream.span(),
                    field,
                    format!("upstream `{}` is in the split twice", pool.name),
                    "name each upstream once, with the sum of its weights",
                ));
            }
            let weight = *arm.weight.get_ref();
            if weight > MAX_SPLIT_WEIGHT {
                return Err(self.err(
                    arm.weight.span(),
                    field,
                    format!("weight {weight} is over {MAX_SPLIT_WEIGHT}"),
                    "weights are shares: 95 and 5, or 9,990 and 10 for 0.1 %",
                ));
            }
            pools.push(pool);
            split.push(SplitArm {
                upstream: pool.name.clone(),
                weight,
            });
        }
        if split.iter().all(|a| a.weight == 0) {
            return Err(self.err(
                span,
                field,
                "every weight is 0: nothing would be sent",
                "give at least one arm a weight above 0",
            ));
        }
        Ok((pools, split))
    }

    pub(super) fn host_pattern(
        &self,
        h: &Spanned<String>,
        key: &str,
    ) -> Result<HostPattern, PolicyError> {
        let text = h.get_ref().trim().to_ascii_lowercase();
        let (wild, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, text.clone()),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !name.starts_with('.');
        if !valid {
            return Err(self.err(
                h.span(),
                format!("{key}.match.host"),
                format!("`{}` is not a host name", h.get_ref()),
                "write a name such as \"api.example.com\" or \"*.example.com\", without port",
            ));
        }
        Ok(if wild {
            HostPattern::Subdomains(format!(".{name}"))
        } else {
            HostPattern::Exact(name)
        })
    }
}
