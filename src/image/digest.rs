//! File digests, streamed so that gigabyte disks never sit in memory.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::Digest;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stream<D: Digest>(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    stream::<sha2::Sha256>(path)
}

pub fn sha512_file(path: &Path) -> io::Result<String> {
    stream::<sha2::Sha512>(path)
}

pub fn sha256(data: &[u8]) -> String {
    hex(&sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), sha256(b"abc"));
        assert!(sha512_file(&p).unwrap().starts_with("ddaf35a193617aba"));
    }
}
