//! Route matching: a request's method, host, path and headers → the first
//! `[[route]]` (in file order) whose `match` accepts it.
//!
//! Owns `RouteMatch` (what one route accepts, and whether one route's match
//! covers another's, for the shadowing check) and `RouteTable`. It does not
//! know what a route does once chosen; `handler.rs` does.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// What one `[[route]]`'s `match` accepts. Empty parts accept anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// `None` accepts every method.
    pub methods: Option<Vec<Method>>,
    /// Exact paths; together with `path_prefix` a path matches either.
    pub paths: Vec<String>,
    pub path_prefix: Option<String>,
    pub host: Option<HostPattern>,
    /// `match.headers`: every one present, with this value (`None`: any).
    pub headers: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// `host = "api.example.com"` or `host = "*.example.com"` (any subdomain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` → `.example.com`.
    Subdomains(String),
}

// === impl RouteMatch ===

impl RouteMatch {
    /// `host` is the request's host, lower-case, without port.
    pub fn accepts(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> bool {
        for (name, want) in &self.headers {
            let mut values = headers.get_all(name).iter();
            let found = match want {
                None => values.next().is_some(),
                Some(want) => values.any(|v| v == want),
            };
            if !found {
                return false;
            }
        }
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        if let Some(pattern) = &self.host {
            match host {
                Some(h) if pattern.accepts(h) => {}
                _ => return false,
            }
        }
        self.accepts_path(path)
    }

    fn accepts_path(&self, path: &str) -> bool {
        if self.paths.is_empty() && self.path_prefix.is_none() {
            return true;
        }
        self.paths.iter().any(|p| p == path)
            || self
                .path_prefix
                .as_deref()
                .is_some_and(|prefix| path.starts_with(prefix))
    }

    /// True when every request `later` accepts is also accepted by `self`, so
    /// `later`, placed after `self`, could never be chosen.
    pub fn covers(&self, later: &RouteMatch) -> bool {
        let methods = match (&self.methods, &later.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|m| mine.contains(m)),
        };
        let hosts = match (&self.host, &later.host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => mine.covers(theirs),
        };
        // Every header this one asks for, `later` asks for too (with the
        // same value, unless this one takes any).
        let headers = self.headers.iter().all(|(name, want)| {
            later
                .headers
                .iter()
                .any(|(n, v)| n == name && (want.is_none() || want == v))
        });
        methods && hosts && headers && self.covers_paths(later)
    }

    fn covers_paths(&self, later: &RouteMatch) -> bool {
        if self.paths.is_empty() && self.path_prefix.is_none() {
            return true;
        }
        if later.paths.is_empty() && later.path_prefix.is_none() {
            return false;
        }
        let prefix_covered = match (&self.path_prefix, &later.path_prefix) {
            (_, None) => true,
            (Some(mine), Some(theirs)) => theirs.starts_with(mine.as_str()),
            (None, Some(_)) => false,
        };
        prefix_covered && later.paths.iter().all(|p| self.accepts_path(p))
    }
}

// === impl HostPattern ===

impl HostPattern {
    pub fn accepts(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomains(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }

    fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (_, HostPattern::Exact(h)) => self.accepts(h),
            (HostPattern::Subdomains(a), HostPattern::Subdomains(b)) => b.ends_with(a.as_str()),
            (HostPattern::Exact(_), HostPattern::Subdomains(_)) => false,
        }
    }
}

impl std::fmt::Display for RouteMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.methods {
            Some(m) => {
                let names: Vec<&str> = m.iter().map(Method::as_str).collect();
                write!(f, "{}", names.join("|"))?;
            }
            None => write!(f, "*")?,
        }
        match &self.host {
            Some(HostPattern::Exact(h)) => write!(f, " {h}")?,
            Some(HostPattern::Subdomains(s)) => write!(f, " *{s}")?,
            None => {}
        }
        let mut parts: Vec<String> = self.paths.clone();
        if let Some(p) = &self.path_prefix {
            parts.push(format!("{p}*"));
        }
        if parts.is_empty() {
            parts.push("/*".into());
        }
        write!(f, " {}", parts.join(" "))?;
        for (name, value) in &self.headers {
            match value.as_ref().and_then(|v| v.to_str().ok()) {
                Some(v) => write!(f, " [{name}: {v}]")?,
                None => write!(f, " [{name}]")?,
            }
        }
        Ok(())
    }
}

/// Routes in file order; the first whose match accepts the request wins.
pub struct RouteTable<R> {
    routes: Vec<(RouteMatch, Arc<R>)>,
}

impl<R> RouteTable<R> {
    pub fn new(routes: Vec<(RouteMatch, Arc<R>)>) -> Self {
        RouteTable { routes }
    }

    pub fn find(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&Arc<R>> {
        self.routes
            .iter()
            .find(|(m, _)| m.accepts(method, host, path, headers))
            .map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(methods: &[&str], paths: &[&str], prefix: Option<&str>) -> RouteMatch {
        RouteMatch {
            methods: (!methods.is_empty())
                .then(|| methods.iter().map(|m| m.parse().unwrap()).collect()),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            path_prefix: prefix.map(str::to_owned),
            host: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn first_match_wins() {
        let table = RouteTable::new(vec![
            (m(&["POST"], &["/api/generate"], None), Arc::new("generate")),
            (m(&["GET", "HEAD"], &[], Some("/api/")), Arc::new("meta")),
            (m(&[], &[], Some("/")), Arc::new("app")),
        ]);
        let none = HeaderMap::new();
        let find = |method: &str, path: &str| {
            **table
                .find(&method.parse().unwrap(), None, path, &none)
                .unwrap()
        };
        assert_eq!(find("POST", "/api/generate"), "generate");
        assert_eq!(find("GET", "/api/generate"), "meta");
        assert_eq!(find("GET", "/api/tags"), "meta");
        assert_eq!(find("POST", "/api/tags"), "app");
        assert_eq!(find("DELETE", "/x"), "app");
    }

    #[test]
    fn hosts() {
        let mut r = m(&[], &[], None);
        r.host = Some(HostPattern::Subdomains(".example.com".into()));
        let none = HeaderMap::new();
        assert!(r.accepts(&Method::GET, Some("a.example.com"), "/", &none));
        assert!(!r.accepts(&Method::GET, Some("example.com"), "/", &none));
        assert!(!r.accepts(&Method::GET, None, "/", &none));
    }

    #[test]
    fn headers_match_and_cover() {
        let canary = HeaderName::from_static("x-canary");
        let mut one = m(&[], &[], None);
        one.headers = vec![(canary.clone(), Some(HeaderValue::from_static("1")))];
        let mut any = m(&[], &[], None);
        any.headers = vec![(canary.clone(), None)];
        let mut h = HeaderMap::new();
        assert!(!one.accepts(&Method::GET, None, "/", &h));
        assert!(!any.accepts(&Method::GET, None, "/", &h));
        h.append(canary.clone(), HeaderValue::from_static("0"));
        assert!(!one.accepts(&Method::GET, None, "/", &h));
        assert!(any.accepts(&Method::GET, None, "/", &h));
        // Any of its values.
        h.append(canary, HeaderValue::from_static("1"));
        assert!(one.accepts(&Method::GET, None, "/", &h));
        // A header route does not shadow the route without it; the route
        // without it shadows every header route after it.
        let plain = m(&[], &[], None);
        assert!(!one.covers(&plain));
        assert!(plain.covers(&one));
        assert!(any.covers(&one));
        assert!(!one.covers(&any));
        assert_eq!(one.to_string(), "* /* [x-canary: 1]");
    }

    #[test]
    fn covering() {
        let all = m(&[], &[], Some("/"));
        let api = m(&["GET"], &[], Some("/api/"));
        let gen = m(&["GET"], &["/api/generate"], None);
        assert!(all.covers(&api));
        assert!(api.covers(&gen));
        assert!(!gen.covers(&api));
        assert!(!api.covers(&m(&["POST"], &["/api/generate"], None)));
        assert!(!m(&["GET"], &[], None).covers(&m(&[], &[], None)));
    }
}
