//! An L2's saved state as it travels over the links through L0: QEMU's
//! migration stream (CPU and devices; its RAM skipped), gzip-compressed,
//! in base64. (Between L1s that both have a state window the stream moves
//! with the pages instead, as it is: `state_window`.)
//!
//! The stream is mostly the L2's small ROM and BIOS RAM blocks, which
//! QEMU 7.2's `x-ignore-shared` still sends; they compress well, and every
//! byte crosses two virtio-serial links inside the L2's downtime (aged L1
//! to L0, L0 to the clean L1). A state without gzip's magic is taken as
//! the plain stream (QEMU's starts with `QEVM`), as an older agent sent it.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use base64::{engine::general_purpose::STANDARD, Engine};
use flate2::{read::GzDecoder, write::GzEncoder, Compression};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The stream, compressed and in base64.
pub fn encode(stream: &[u8]) -> Result<String> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(stream)?;
    Ok(STANDARD.encode(gz.finish()?))
}

/// The stream back from what [`encode`] made (or a plain one in base64).
pub fn decode(state: &str) -> Result<Vec<u8>> {
    let bytes = STANDARD.decode(state).context("the state is not base64")?;
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(bytes);
    }
    let mut stream = Vec::new();
    GzDecoder::new(&bytes[..]).read_to_end(&mut stream).context("the state is not valid gzip")?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_comes_back_whole_and_smaller() {
        let mut stream = b"QEVM".to_vec();
        stream.extend(std::iter::repeat_n(0u8, 256 << 10));
        stream.extend((0..4096u32).flat_map(|i| i.to_le_bytes()));
        let encoded = encode(&stream).unwrap();
        assert!(encoded.len() < stream.len() / 10, "{} bytes for {}", encoded.len(), stream.len());
        assert_eq!(decode(&encoded).unwrap(), stream);
    }

    #[test]
    fn a_plain_stream_is_taken_as_it_is_and_garbage_is_refused() {
        let plain = STANDARD.encode(b"QEVM\0\0\0\x03");
        assert_eq!(decode(&plain).unwrap(), b"QEVM\0\0\0\x03");
        assert!(decode("not base64!").is_err());
        assert!(decode(&STANDARD.encode([0x1f, 0x8b, 1, 2, 3])).is_err());
    }
}
