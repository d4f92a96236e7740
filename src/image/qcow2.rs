//! Just enough of the qcow2 header to learn an overlay's backing file, so vibebox can
//! tell which sessions use an image without running `qemu-img`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// QEMU refuses longer backing file names; anything larger is a corrupt or hostile file.
const MAX_BACKING_LEN: u32 = 1023;

/// The backing file named in a qcow2 header, parsed from its first bytes.
pub fn backing_from_header(
    header: &[u8],
    read_at: impl Fn(u64, usize) -> Option<Vec<u8>>,
) -> Option<PathBuf> {
    if header.len() < 20 || &header[..4] != MAGIC {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(header[16..20].try_into().ok()?);
    if offset == 0 || len == 0 || len > MAX_BACKING_LEN {
        return None;
    }
    let name = read_at(offset, len as usize)?;
    use std::os::unix::ffi::OsStringExt;
    Some(PathBuf::from(std::ffi::OsString::from_vec(name)))
}

/// The backing file of the qcow2 image at `path`, if it has one.
pub fn backing_file(path: &Path) -> Option<PathBuf> {
    let mut f = File::open(path).ok()?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).ok()?;
    let f = std::cell::RefCell::new(f);
    backing_from_header(&header, |off, len| {
        let mut f = f.borrow_mut();
        f.seek(SeekFrom::Start(off)).ok()?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).ok()?;
        Some(buf)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backing_name() {
        let mut img = vec![0u8; 200];
        img[..4].copy_from_slice(MAGIC);
        img[8..16].copy_from_slice(&100u64.to_be_bytes());
        img[16..20].copy_from_slice(&9u32.to_be_bytes());
        img[100..109].copy_from_slice(b"/img/base");
        let at = |o: u64, l: usize| img.get(o as usize..o as usize + l).map(|s| s.to_vec());
        assert_eq!(
            backing_from_header(&img[..20], at),
            Some(PathBuf::from("/img/base"))
        );
        let mut bad = img.clone();
        bad[0] = b'X';
        assert_eq!(backing_from_header(&bad[..20], at), None);
        let mut huge = img.clone();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        assert_eq!(backing_from_header(&huge[..20], at), None);
        assert_eq!(backing_from_header(&img[..10], at), None);
    }
}
