//! Content codings: their names (what the policy's `[compression]
//! algorithms` lists and `Content-Encoding` says), and the coder that
//! compresses or decodes a body chunk by chunk, in bounded steps.
//!
//! Imports nothing above it, so bodies (`body`), the policy and the cache
//! can all use it. Which coding a client gets, and what is compressed at
//! all, is `compress`'s.

use std::io::Write;

use brotli::enc::StandardAlloc;
use bytes::Bytes;
use http::HeaderValue;

/// A content coding Hyperion can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Br,
    Gzip,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// A coding an upstream may have applied that Hyperion can undo.
/// (`deflate` is not one: flate2 cannot tell a zlib stream cut short from
/// a whole one, and a cut body must never look complete.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    Br,
    Gzip,
}

impl Decoding {
    pub fn parse(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"gzip") || name.eq_ignore_ascii_case(b"x-gzip") {
            Some(Decoding::Gzip)
        } else if name.eq_ignore_ascii_case(b"br") {
            Some(Decoding::Br)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decoding::Br => "br",
            Decoding::Gzip => "gzip",
        }
    }
}

/// A body's compressor or decompressor, fed chunk by chunk.
pub struct Coder {
    kind: CoderKind,
    /// Flush after every chunk, so each one can be decoded on arrival
    /// (NDJSON, SSE); otherwise the compressor keeps what it needs.
    flush_each: bool,
    /// Input a decoder has not read yet: it is fed in small steps so that
    /// what one step produces stays bounded (a small bomb stays small).
    pending: Bytes,
    /// Bytes in and out, reported to the metrics when the coder goes.
    tally: Tally,
}

/// A coder's bytes in and out, for `hyperion_compression_*_bytes_total`:
/// reported once, when it is dropped (with its coder, finished or not).
struct Tally {
    coding: &'static str,
    op: &'static str,
    bytes_in: u64,
    bytes_out: u64,
}

impl Drop for Tally {
    fn drop(&mut self) {
        crate::telemetry::coded(self.coding, self.op, self.bytes_in, self.bytes_out);
    }
}

enum CoderKind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Gunzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Unbrotli(Box<Unbrotli>),
}

/// A brotli decoder on the library's streaming call, so that output comes
/// in bounded steps even when a few input bytes expand to gigabytes.
struct Unbrotli {
    state: brotli::BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>,
    out: Vec<u8>,
    total_out: usize,
    /// It stopped for room, not for input: more output is waiting.
    more_output: bool,
    finished: bool,
}

impl Unbrotli {
    fn new() -> Self {
        Unbrotli {
            state: brotli::BrotliState::new(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ),
            out: Vec::new(),
            total_out: 0,
            more_output: false,
            finished: false,
        }
    }

    /// Reads `input` (advancing it) until it is used up, the stream ends,
    /// or `limit` bytes of output are waiting.
    fn decode(&mut self, input: &mut Bytes, limit: usize) -> std::io::Result<()> {
        use bytes::Buf;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let (mut avail_in, mut in_off) = (input.len(), 0);
            let (mut avail_out, mut out_off) = (buf.len(), 0);
            let result = brotli::BrotliDecompressStream(
                &mut avail_in,
                &mut in_off,
                input,
                &mut avail_out,
                &mut out_off,
                &mut buf,
                &mut self.total_out,
                &mut self.state,
            );
            input.advance(in_off);
            self.out.extend_from_slice(&buf[..out_off]);
            self.more_output = false;
            match result {
                brotli::BrotliResult::ResultFailure => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a brotli stream",
                    ))
                }
                brotli::BrotliResult::ResultSuccess => {
                    self.finished = true;
                    if !input.is_empty() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "bytes after the end of the brotli stream",
                        ));
                    }
                    return Ok(());
                }
                brotli::BrotliResult::NeedsMoreInput => return Ok(()),
                brotli::BrotliResult::NeedsMoreOutput => {
                    if self.out.len() >= limit {
                        self.more_output = true;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Brotli's window: 4 MiB, ample for model answers, small enough per stream.
const BROTLI_LGWIN: u32 = 22;
/// Input the gzip decoder reads per step: at most ~1 MiB of output
/// (deflate's ratio is at most ~1032:1). Brotli's is unbounded: its
/// decoder stops on output instead.
const DECODE_STEP_IN: usize = 1024;
/// A decoder stops reading once a step has produced this much.
pub(crate) const DECODE_STEP_OUT: usize = 256 * 1024;

impl Coder {
    /// Compresses: `level` is gzip 0–9 or brotli quality 0–11 (checked by
    /// the policy).
    pub fn encoder(coding: Coding, level: u32, flush_each: bool) -> Self {
        let kind = match coding {
            Coding::Gzip => CoderKind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level),
            )),
            Coding::Br => CoderKind::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                level,
                BROTLI_LGWIN,
            ))),
        };
        Coder {
            kind,
            flush_each,
            pending: Bytes::new(),
            tally: Tally {
                coding: coding.as_str(),
                op: "encode",
                bytes_in: 0,
                bytes_out: 0,
            },
        }
    }

    /// Decompresses, passing on what each step decodes at once.
    pub fn decoder(decoding: Decoding) -> Self {
        let (kind, coding) = match decoding {
            Decoding::Gzip => (
                CoderKind::Gunzip(flate2::write::MultiGzDecoder::new(Vec::new())),
                "gzip",
            ),
            Decoding::Br => (CoderKind::Unbrotli(Box::new(Unbrotli::new())), "br"),
        };
        Coder {
            kind,
            flush_each: true,
            pending: Bytes::new(),
            tally: Tally {
                coding,
                op: "decode",
                bytes_in: 0,
                bytes_out: 0,
            },
        }
    }

    fn decodes(&self) -> bool {
        matches!(self.kind, CoderKind::Gunzip(_) | CoderKind::Unbrotli(_))
    }

    /// Feeds `data`; returns what is ready to send (maybe nothing). A
    /// decoder may keep part of `data` back: call `resume` while
    /// `has_pending`.
    pub fn push(&mut self, data: Bytes) -> std::io::Result<Bytes> {
        debug_assert!(self.pending.is_empty(), "resume until nothing is pending");
        self.tally.bytes_in += data.len() as u64;
        if !self.decodes() {
            self.step(&data)?;
            return Ok(self.take_output());
        }
        self.pending = data;
        self.resume()
    }

    /// Whether input fed earlier is still to be read, or its output to
    /// be handed out.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || matches!(&self.kind, CoderKind::Unbrotli(b) if b.more_output)
    }

    /// Reads on from the input kept back, for at most one step's output.
    pub fn resume(&mut self) -> std::io::Result<Bytes> {
        if let CoderKind::Unbrotli(b) = &mut self.kind {
            b.decode(&mut self.pending, DECODE_STEP_OUT)?;
            let out: Bytes = std::mem::take(&mut b.out).into();
            self.tally.bytes_out += out.len() as u64;
            return Ok(out);
        }
        loop {
            let n = self.pending.len().min(DECODE_STEP_IN);
            let part = self.pending.split_to(n);
            self.step(&part)?;
            if self.pending.is_empty() || self.output_len() >= DECODE_STEP_OUT {
                return Ok(self.take_output());
            }
        }
    }

    fn step(&mut self, data: &[u8]) -> std::io::Result<()> {
        fn step<W: Write>(w: &mut W, data: &[u8], flush: bool) -> std::io::Result<()> {
            w.write_all(data)?;
            if flush {
                w.flush()?;
            }
            Ok(())
        }
        let flush = self.flush_each;
        match &mut self.kind {
            CoderKind::Gzip(e) => step(e, data, flush),
            CoderKind::Br(e) => step(e.as_mut(), data, flush),
            CoderKind::Gunzip(d) => step(d, data, flush),
            CoderKind::Unbrotli(_) => unreachable!("brotli is decoded in resume"),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match &mut self.kind {
            CoderKind::Gzip(e) => e.get_mut(),
            CoderKind::Br(e) => e.get_mut(),
            CoderKind::Gunzip(d) => d.get_mut(),
            CoderKind::Unbrotli(d) => &mut d.out,
        }
    }

    fn output_len(&mut self) -> usize {
        self.output().len()
    }

    fn take_output(&mut self) -> Bytes {
        let out: Bytes = std::mem::take(self.output()).into();
        self.tally.bytes_out += out.len() as u64;
        out
    }

    /// Ends the stream; returns its last bytes. A decoder fails here when
    /// its input stopped short.
    pub fn finish(self) -> std::io::Result<Bytes> {
        debug_assert!(self.pending.is_empty(), "resume until nothing is pending");
        let Coder {
            kind, mut tally, ..
        } = self;
        let out = match kind {
            CoderKind::Gzip(e) => e.finish()?,
            CoderKind::Br(e) => e.into_inner(),
            CoderKind::Gunzip(d) => d.finish()?,
            CoderKind::Unbrotli(d) if d.finished => d.out,
            CoderKind::Unbrotli(_) => return Err(truncated()),
        };
        tally.bytes_out += out.len() as u64;
        Ok(out.into())
    }

    /// Compresses a whole body at once.
    pub fn whole(coding: Coding, level: u32, body: &[u8]) -> std::io::Result<Bytes> {
        let mut e = Coder::encoder(coding, level, false);
        e.tally.bytes_in += body.len() as u64;
        e.step(body)?;
        let head = e.take_output();
        let tail = e.finish()?;
        if head.is_empty() {
            return Ok(tail);
        }
        let mut out = Vec::with_capacity(head.len() + tail.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&tail);
        Ok(out.into())
    }
}

fn truncated() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the encoded body stops short",
    )
}
