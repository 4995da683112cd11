//! `[tracing]`: the collector's URL, the sample ratio, the export bounds,
//! and the export headers read from the environment (checked here, once:
//! a malformed header fails the policy, not the first export).

use std::time::Duration;

use toml::Spanned;

use super::Validator;
use crate::policy::error::PolicyError;
use crate::policy::raw::RawTracing;
use crate::policy::{ExportHeaders, TracingPolicy};

impl Validator<'_> {
    pub(super) fn tracing(&self, raw: Spanned<RawTracing>) -> Result<TracingPolicy, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let Some(endpoint) = raw.otlp_endpoint else {
            return Err(self.err(
                span,
                "tracing.otlp_endpoint",
                "[tracing] has no collector to send to",
                "set otlp_endpoint = \"http://127.0.0.1:4318/v1/traces\" (the collector's OTLP/HTTP traces URL), or remove [tracing]",
            ));
        };
        let endpoint_span = endpoint.span();
        let text = endpoint.into_inner();
        let uri: http::Uri = text.parse().map_err(|_| {
            self.err(
                endpoint_span.clone(),
                "tracing.otlp_endpoint",
                format!("`{text}` is not a URL"),
                "write the collector's traces URL, e.g. \"http://127.0.0.1:4318/v1/traces\"",
            )
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(self.err(
                endpoint_span,
                "tracing.otlp_endpoint",
                format!("`{text}` is not an http:// or https:// URL with a host"),
                "write the collector's traces URL, e.g. \"http://127.0.0.1:4318/v1/traces\"",
            ));
        }
        if uri.scheme_str() == Some("https")
            && self
                .platform_roots
                .get_or_init(|| std::sync::Arc::new(crate::policy::platform_roots()))
                .is_empty()
        {
            return Err(self.err(
                endpoint_span,
                "tracing.otlp_endpoint",
                "an https:// collector, but this machine has no CA certificates to check it with",
                "install the platform's CA certificates (e.g. apt-get install ca-certificates), or send to an http:// collector on this host",
            ));
        }
        if uri.path() == "/" {
            return Err(self.err(
                endpoint_span,
                "tracing.otlp_endpoint",
                format!("`{text}` has no path: the URL is used as it is"),
                format!(
                    "OTLP/HTTP collectors take traces at /v1/traces: \"{}/v1/traces\"",
                    text.trim_end_matches('/')
                ),
            ));
        }
        let sample_ratio = match raw.sample_ratio {
            None => 1.0,
            Some(r) => {
                let span = r.span();
                let r = r.into_inner();
                if !(0.0..=1.0).contains(&r) {
                    return Err(self.err(
                        span,
                        "tracing.sample_ratio",
                        format!("{r} is not between 0 and 1"),
                        "the share of requests traced: 1.0 for all, 0.01 for one in a hundred",
                    ));
                }
                r
            }
        };
        let service_name = match raw.service_name {
            None => "hyperion".to_owned(),
            Some(n) if n.get_ref().trim().is_empty() => {
                return Err(self.err(
                    n.span(),
                    "tracing.service_name",
                    "the service name is empty",
                    "name the service as your traces should show it, e.g. \"hyperion\"",
                ))
            }
            Some(n) => n.into_inner(),
        };
        let (headers_env, headers) = match raw.headers_env {
            None => (None, Vec::new()),
            Some(var) => {
                let span = var.span();
                let var = var.into_inner();
                let value = std::env::var(&var).map_err(|_| {
                    self.err(
                        span.clone(),
                        "tracing.headers_env",
                        format!("the environment variable {var} is not set"),
                        format!("export {var}=\"authorization=Bearer <token>\" (key=value pairs, comma-separated), or remove headers_env"),
                    )
                })?;
                let headers = export_headers(&value).map_err(|why| {
                    self.err(
                        span,
                        "tracing.headers_env",
                        format!("{var} holds {why}"),
                        "write key=value pairs separated by commas, e.g. \"authorization=Bearer abc,x-scope=prod\"",
                    )
                })?;
                (Some(var), headers)
            }
        };
        let bounded = |v: Option<Spanned<u64>>, key: &str, default: u64, max: u64| {
            let Some(v) = v else { return Ok(default) };
            let span = v.span();
            let n = v.into_inner();
            if n == 0 || n > max {
                return Err(self.err(
                    span,
                    key,
                    format!("{n} is not between 1 and {max}"),
                    format!("the default, {default}, suits most collectors"),
                ));
            }
            Ok(n)
        };
        let max_queue = bounded(raw.max_queue, "tracing.max_queue", 2048, 1 << 20)?;
        let batch_size = bounded(raw.batch_size, "tracing.batch_size", 512, 1 << 16)?;
        let duration = |v: Option<Spanned<super::Dur>>, key: &str, default: Duration| {
            let Some(v) = v else { return Ok(default) };
            let span = v.span();
            let d = v.into_inner().0;
            if d < Duration::from_millis(10) || d > Duration::from_secs(300) {
                return Err(self.err(
                    span,
                    key,
                    format!(
                        "{} is not between 10ms and 5m",
                        humantime::format_duration(d)
                    ),
                    format!("e.g. {key} = \"{}\"", humantime::format_duration(default)),
                ));
            }
            Ok(d)
        };
        let export_interval = duration(
            raw.export_interval,
            "tracing.export_interval",
            Duration::from_secs(2),
        )?;
        let export_timeout = duration(
            raw.export_timeout,
            "tracing.export_timeout",
            Duration::from_secs(10),
        )?;
        Ok(TracingPolicy {
            otlp_endpoint: uri,
            sample_ratio,
            service_name,
            headers_env,
            headers: ExportHeaders(headers),
            max_queue: usize::try_from(max_queue).unwrap_or(usize::MAX),
            batch_size: usize::try_from(batch_size).unwrap_or(usize::MAX),
            export_interval,
            export_timeout,
        })
    }
}

/// `key=value,key=value` (OTLP's `OTEL_EXPORTER_OTLP_HEADERS` format,
/// values percent-decoded by the exporter): each a valid header.
fn export_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, pair) in text.split(',').enumerate() {
        if pair.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("a pair without `=` (pair {})", i + 1));
        };
        let (k, v) = (k.trim(), v.trim());
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err(format!("`{k}`, which is not a header name"));
        }
        if http::HeaderValue::from_str(v).is_err() {
            return Err(format!("a value for `{k}` that is not a header value"));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_headers_are_pairs() {
        assert_eq!(
            export_headers("authorization=Bearer abc, x-scope-orgid = prod").unwrap(),
            vec![
                ("authorization".to_owned(), "Bearer abc".to_owned()),
                ("x-scope-orgid".to_owned(), "prod".to_owned())
            ]
        );
        assert!(export_headers("no-equals").is_err());
        assert!(export_headers("bad name=1").is_err());
        assert!(export_headers("").unwrap().is_empty());
    }
}
