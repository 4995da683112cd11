//! The OTLP/HTTP exporter over our own HTTP client: the OpenTelemetry
//! crate encodes the protobuf, adds `OTEL_EXPORTER_OTLP_*` headers from
//! the environment and retries what a collector asks to be retried
//! (429, 502–504, honouring `Retry-After`); this file sends each request
//! on hyper over TCP, or TLS for `https://` (the platform's CA
//! certificates), with its own timeout and a bounded answer.
//!
//! One connection per export: a batch every few seconds does not need a
//! pool, and a collector that restarts is simply reached again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};

use crate::policy::TracingPolicy;

/// The largest collector answer read (its partial-success message).
const MAX_ANSWER: usize = 1 << 20;

/// The exporter for `policy`.
pub fn exporter(
    policy: &TracingPolicy,
    runtime: &tokio::runtime::Handle,
) -> Result<SpanExporter, String> {
    let tls = match policy.otlp_endpoint.scheme_str() {
        Some("https") => Some(tls_config()?),
        _ => None,
    };
    let client = Transport {
        runtime: runtime.clone(),
        timeout: policy.export_timeout,
        tls,
    };
    let headers: HashMap<String, String> = policy.headers.0.iter().cloned().collect();
    SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(policy.otlp_endpoint.to_string())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(policy.export_timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::policy::platform_roots();
    if roots.is_empty() {
        return Err(
            "an https:// collector, but this machine has no CA certificates to check it with (apt-get install ca-certificates)"
                .to_owned(),
        );
    }
    Ok(crate::policy::http1_client_config(Arc::new(roots)))
}

#[derive(Clone)]
struct Transport {
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl HttpClient for Transport {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let timeout = self.timeout;
        let tls = self.tls.clone();
        // On our runtime whoever calls: the exporter's task runs there
        // already, but a flush may come from elsewhere.
        let task = self.runtime.spawn(async move {
            match tokio::time::timeout(timeout, post(request, tls)).await {
                Ok(result) => result,
                Err(_) => Err(HttpError::from(format!(
                    "no answer from the collector within {}",
                    humantime::format_duration(timeout)
                ))),
            }
        });
        task.await.map_err(|e| Box::new(e) as HttpError)?
    }
}

async fn post(
    request: Request<Bytes>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Response<Bytes>, HttpError> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .ok_or("the collector's URL has no host")?
        .clone();
    let https = parts.uri.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    let _ = stream.set_nodelay(true);
    // Origin form and a Host header: hyper's connection API sends the URI
    // as given.
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()?;
    parts.headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(authority.as_str())?,
    );
    let request = http::Request::from_parts(parts, Full::new(body));
    let response = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            send(TokioIo::new(stream), request).await?
        }
        None => send(TokioIo::new(stream), request).await?,
    };
    let (head, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
    Ok(Response::from_parts(head, body))
}

async fn send<IO>(
    io: IO,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, HttpError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(request).await?)
}
