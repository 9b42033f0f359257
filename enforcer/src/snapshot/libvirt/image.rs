//! A VM's memory image in libvirt's save format, so `virDomainRestore` reads it: a header
//! (marked partial until QEMU's migration stream is whole), the domain XML, then the stream
//! QEMU writes into the same file through the fd it is given. Calls nothing else of the product.

use std::{
    fs::File,
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use crate::snapshot::private::private_file;

/// libvirt's save-image header (`virQEMUSaveHeader`, version 2): 16-byte magic, then 19 native
/// u32s (version, data_len, was_running, compressed, cookieOffset, 14 unused). The domain XML
/// follows, NUL-terminated, then QEMU's migration stream.
const SAVE_MAGIC: &[u8; 16] = b"LibvirtQemudSave";
const SAVE_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
const SAVE_VERSION: u32 = 2;
const SAVE_HEADER_LEN: usize = 16 + 19 * 4;

fn save_header(magic: &[u8; 16], data_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(SAVE_HEADER_LEN);
    h.extend_from_slice(magic);
    for field in [
        SAVE_VERSION,
        data_len,
        1, /* was running */
        0, /* raw */
        0, /* no cookie */
    ] {
        h.extend_from_slice(&field.to_ne_bytes());
    }
    h.resize(SAVE_HEADER_LEN, 0);
    h
}

/// An image being written: created partial, marked whole by [`SaveImage::finish`].
pub(super) struct SaveImage {
    pub(super) path: PathBuf,
    pub(super) file: File,
    data_len: u32,
}

impl SaveImage {
    /// Creates `path` (never over an existing file), writes the partial header and `xml`.
    pub(super) fn create(path: &Path, xml: &str) -> std::io::Result<Self> {
        let mut file = private_file(path)?;
        let mut data = xml.as_bytes().to_vec();
        data.push(0);
        let data_len = data.len() as u32;
        file.write_all(&save_header(SAVE_PARTIAL, data_len))?;
        file.write_all(&data)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            data_len,
        })
    }

    /// QEMU's stream is whole: marks the image so (libvirt refuses partial images), durably.
    pub(super) fn finish(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file
            .write_all(&save_header(SAVE_MAGIC, self.data_len))?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_header_has_libvirts_layout() {
        let h = save_header(SAVE_MAGIC, 1234);
        assert_eq!(h.len(), 92);
        assert_eq!(&h[..16], b"LibvirtQemudSave");
        assert_eq!(u32::from_ne_bytes(h[16..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(h[20..24].try_into().unwrap()), 1234);
        assert_eq!(u32::from_ne_bytes(h[24..28].try_into().unwrap()), 1);
    }

    #[test]
    fn an_image_is_partial_until_finished() {
        let dir = std::env::temp_dir().join(format!("enforcer-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.save");
        let mut image = SaveImage::create(&path, "<domain/>").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "a memory image is its owner's only"
        );
        assert!(
            SaveImage::create(&path, "<domain/>").is_err(),
            "never over a file"
        );
        image.file.write_all(b"stream").unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..16], SAVE_PARTIAL);
        image.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..16], SAVE_MAGIC);
        assert_eq!(
            &bytes[SAVE_HEADER_LEN..SAVE_HEADER_LEN + 10],
            b"<domain/>\0"
        );
        assert!(bytes.ends_with(b"stream"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
