//! Length-prefixed frame codec: `[u32 LE payload length][postcard payload]`.
//!
//! The decoder is incremental and bounded: it never buffers more than one
//! maximal frame plus whatever the caller pushed in one call, and it rejects a
//! header announcing more than [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) before
//! reading the body.

use crate::{Frame, HEADER_LEN, MAX_FRAME_LEN};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// What can go wrong encoding or decoding a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// A header announced a payload larger than the limit.
    FrameTooLarge { len: usize, max: usize },
    /// The payload is not a valid message of the expected type.
    Malformed(String),
    /// A message to send does not fit in one frame.
    MessageTooLarge { len: usize, max: usize },
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::FrameTooLarge { len, max } => {
                write!(f, "peer sent a {len}-byte frame; the limit is {max}")
            }
            CodecError::Malformed(e) => write!(f, "malformed frame: {e}"),
            CodecError::MessageTooLarge { len, max } => {
                write!(
                    f,
                    "message of {len} bytes exceeds the {max}-byte frame limit"
                )
            }
        }
    }
}

impl std::error::Error for CodecError {}

/// Encodes one frame (header + payload) into a new buffer.
pub fn encode_frame<M: Serialize>(frame: &Frame<M>) -> Result<Vec<u8>, CodecError> {
    let mut out = postcard::to_extend(frame, vec![0u8; HEADER_LEN])
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    let header = match u32::try_from(len) {
        Ok(h) if len <= MAX_FRAME_LEN => h,
        _ => {
            return Err(CodecError::MessageTooLarge {
                len,
                max: MAX_FRAME_LEN,
            })
        }
    };
    out[..HEADER_LEN].copy_from_slice(&header.to_le_bytes());
    Ok(out)
}

/// Decodes one payload (without header) into a frame.
pub fn decode_payload<M: DeserializeOwned>(payload: &[u8]) -> Result<Frame<M>, CodecError> {
    let (frame, rest) = postcard::take_from_bytes::<Frame<M>>(payload)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(frame)
}

/// Incremental frame decoder. Push bytes as they arrive; pull whole payloads.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Read position inside `buf`; consumed bytes are compacted lazily.
    pos: usize,
    max: Option<usize>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder with a smaller frame limit than the protocol's.
    pub fn with_limit(max: usize) -> Self {
        Self {
            max: Some(max.min(MAX_FRAME_LEN)),
            ..Self::default()
        }
    }

    fn limit(&self) -> usize {
        self.max.unwrap_or(MAX_FRAME_LEN)
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Drops any partial frame (the peer went away mid-frame).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }

    /// Returns the next complete payload, `Ok(None)` when more bytes are
    /// needed, or an error when the stream is broken (oversized header). After
    /// an error the connection must be dropped.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, CodecError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&avail[..HEADER_LEN]);
        let len = u32::from_le_bytes(hdr) as usize;
        if len > self.limit() {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.limit(),
            });
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.pos += HEADER_LEN + len;
        Ok(Some(payload))
    }

    /// Returns the next complete, decoded frame.
    pub fn next_frame<M: DeserializeOwned>(&mut self) -> Result<Option<Frame<M>>, CodecError> {
        match self.next_payload()? {
            Some(p) => decode_payload(&p).map(Some),
            None => Ok(None),
        }
    }
}
