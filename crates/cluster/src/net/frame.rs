//! Frames of the cluster RPC: a big-endian `u32` payload length, then that
//! many bytes of one serde_json message. The decoder is a pure function over
//! a byte buffer so it can be property-tested and fuzzed apart from sockets.

use serde::Serialize;

/// Largest frame payload. It bounds what one peer can make us allocate. A
/// frame carries one RPC: an AppendEntries batch (at most
/// `ENTRIES_PER_APPEND_MAX` commands), one snapshot chunk
/// (`SNAPSHOT_CHUNK_BYTES`), or one forwarded command. The largest command is
/// `CreateCluster` with an imported standalone configuration, which is sized
/// by its volumes' extent maps; 64 MiB holds several million extents.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {FRAME_BYTES_MAX}")]
    TooLarge { len: usize },
    #[error("empty frame")]
    Empty,
    #[error("message does not encode: {0}")]
    Encode(String),
}

/// Looks for one whole frame at the start of `buf`. `Ok(None)`: more bytes
/// are needed. `Ok(Some((payload, consumed)))`: one frame, `consumed` bytes
/// long including the header. An error means the stream is broken and the
/// connection must be closed (no resynchronisation is possible).
pub fn decode(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { len });
    }
    let end = FRAME_HEADER_BYTES + len;
    match buf.get(FRAME_HEADER_BYTES..end) {
        Some(payload) => Ok(Some((payload, end))),
        None => Ok(None),
    }
}

/// Length needed before `decode` can succeed, once the header is in `buf`
/// (lets the reader reserve the whole frame at once).
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..FRAME_HEADER_BYTES)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    Some(FRAME_HEADER_BYTES + len.min(FRAME_BYTES_MAX))
}

/// One message as a frame.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; FRAME_HEADER_BYTES];
    serde_json::to_writer(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - FRAME_HEADER_BYTES;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { len });
    }
    out[..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn limits() {
        assert_eq!(decode(&[0, 0, 0]), Ok(None));
        assert_eq!(decode(&[0, 0, 0, 0]), Err(FrameError::Empty));
        let too_large = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert_eq!(
            decode(&too_large),
            Err(FrameError::TooLarge {
                len: FRAME_BYTES_MAX + 1
            })
        );
        let max = (FRAME_BYTES_MAX as u32).to_be_bytes();
        assert_eq!(decode(&max), Ok(None));
    }

    #[test]
    fn encode_roundtrip() {
        let f = encode(&vec![1u32, 2, 3]).unwrap();
        let (payload, used) = decode(&f).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert_eq!(
            serde_json::from_slice::<Vec<u32>>(payload).unwrap(),
            [1, 2, 3]
        );
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and whatever it returns
        /// is consistent with the header.
        #[test]
        fn decode_arbitrary(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            match decode(&buf) {
                Ok(Some((payload, used))) => {
                    prop_assert!(used <= buf.len());
                    prop_assert_eq!(used, FRAME_HEADER_BYTES + payload.len());
                    prop_assert!(!payload.is_empty());
                }
                Ok(None) => {
                    prop_assert!(buf.len() < FRAME_HEADER_BYTES
                        || frame_len(&buf).unwrap() > buf.len());
                }
                Err(_) => prop_assert!(buf.len() >= FRAME_HEADER_BYTES),
            }
        }

        /// A stream of frames cut at arbitrary points decodes to the same
        /// payloads: a prefix is never mistaken for a frame.
        #[test]
        fn decode_split_stream(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 1..6),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let stream: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut buf = Vec::new();
            let mut got = Vec::new();
            let mut fed = 0;
            for cut in cuts {
                buf.extend_from_slice(&stream[fed..cut]);
                fed = cut;
                while let Some((payload, used)) = decode(&buf).unwrap() {
                    got.push(payload.to_vec());
                    buf.drain(..used);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, payloads);
        }
    }
}
