//! The official cloud images `vibebox image pull` knows: `images/catalog.toml`,
//! compiled in like the build recipe so an installed vibebox needs no data files
//! beside it.
//!
//! `VIBEBOX_CATALOG=<file>` replaces it with a file of the same format, for a
//! mirror, an air-gapped network or a test server. That file is the host user's own
//! (an environment variable the guest cannot set), so it is trusted like the
//! built-in one; every image it names is still checked against its sums file.

use std::path::PathBuf;

use serde::Deserialize;

use super::download;

pub const ENV: &str = "VIBEBOX_CATALOG";
const BUILT_IN: &str = include_str!("../../images/catalog.toml");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the image catalog {} (from ${ENV}): {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{col}: {message} (the image catalog named by ${ENV})", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{}: image {name:?} ({arch}): {why} (the image catalog named by ${ENV})", path.display())]
    Invalid {
        path: PathBuf,
        name: String,
        arch: String,
        why: String,
    },
    #[error("no image {name:?} for {arch} in the catalog; known: {known}")]
    Unknown {
        name: String,
        arch: String,
        known: String,
    },
}

/// One cloud image, as listed in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// vibebox's name for the image, e.g. `debian-13`.
    pub name: String,
    /// The Debian codename, e.g. `trixie`.
    pub release: String,
    /// Rust's architecture name (`x86_64`, `aarch64`), the same as `host_arch()`.
    pub arch: String,
    /// Where the image file is.
    pub url: String,
    /// Where the `SHA512SUMS` file that lists it is.
    pub sums_url: String,
    /// The file's name as it appears in the sums file.
    pub file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalog {
    image: Vec<Entry>,
}

/// Parses and checks a catalog's text; `path` only names it in errors.
pub fn parse(text: &str, path: &std::path::Path) -> Result<Vec<Entry>, CatalogError> {
    let catalog: Catalog = toml::from_str(text).map_err(|e| {
        let (line, col) = crate::tomlpos::error_line_col(text, &e);
        CatalogError::Parse {
            path: path.to_path_buf(),
            line,
            col,
            message: e.message().trim().to_string(),
        }
    })?;
    for e in &catalog.image {
        let why = if super::debian_arch(&e.arch).is_none() {
            Some(format!(
                "arch {:?} is not one of x86_64, aarch64",
                e.arch.as_str()
            ))
        } else if download::host_of(&e.url).is_none() {
            Some(format!("url {:?} is not an http(s) URL", e.url))
        } else if download::host_of(&e.sums_url).is_none() {
            Some(format!("sums_url {:?} is not an http(s) URL", e.sums_url))
        } else if e.file.is_empty() || e.file.contains('/') {
            Some(format!("file {:?} must be a plain file name", e.file))
        } else if e.name.is_empty()
            || !e
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            Some("name must be letters, digits, '-' and '.'".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(CatalogError::Invalid {
                path: path.to_path_buf(),
                name: e.name.clone(),
                arch: e.arch.clone(),
                why,
            });
        }
    }
    Ok(catalog.image)
}

/// Every image vibebox can pull: the `VIBEBOX_CATALOG` file if set, else the
/// built-in catalog.
pub fn load() -> Result<Vec<Entry>, CatalogError> {
    match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path).map_err(|source| CatalogError::Read {
                path: path.clone(),
                source,
            })?;
            parse(&text, &path)
        }
        // Compiled in and parsed by a unit test: it cannot fail here.
        None => Ok(parse(BUILT_IN, std::path::Path::new("images/catalog.toml"))
            .expect("the built-in catalog is valid")),
    }
}

/// The catalog entry for an image name and architecture.
pub fn find(entries: &[Entry], name: &str, arch: &str) -> Result<Entry, CatalogError> {
    entries
        .iter()
        .find(|e| e.name == name && e.arch == arch)
        .cloned()
        .ok_or_else(|| {
            let mut known: Vec<String> = entries
                .iter()
                .filter(|e| e.arch == arch)
                .map(|e| e.name.clone())
                .collect();
            known.dedup();
            CatalogError::Unknown {
                name: name.to_string(),
                arch: arch.to_string(),
                known: if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                },
            }
        })
}

/// The name `vibebox image pull` uses without an argument: the first entry for the
/// architecture.
pub fn default_name(entries: &[Entry], arch: &str) -> Option<String> {
    entries
        .iter()
        .find(|e| e.arch == arch)
        .map(|e| e.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn built_in() -> Vec<Entry> {
        parse(BUILT_IN, Path::new("catalog.toml")).unwrap()
    }

    #[test]
    fn built_in_catalog_covers_both_arches() {
        let all = built_in();
        for arch in ["x86_64", "aarch64"] {
            let e = find(&all, "debian-13", arch).expect(arch);
            assert_eq!(e.release, "trixie");
            let debarch = crate::image::debian_arch(arch).unwrap();
            assert_eq!(e.file, format!("debian-13-generic-{debarch}.qcow2"));
            assert!(e.url.starts_with("https://"), "{}", e.url);
            assert!(e.url.ends_with(&format!("/{}", e.file)), "{}", e.url);
            let dir = e.url.strip_suffix(&e.file).unwrap();
            assert_eq!(e.sums_url, format!("{dir}SHA512SUMS"));
            assert_eq!(default_name(&all, arch).as_deref(), Some("debian-13"));
        }
        let err = find(&all, "debian-13", "riscv64").unwrap_err().to_string();
        assert!(err.contains("known: none"), "{err}");
        let err = find(&all, "nope", "x86_64").unwrap_err().to_string();
        assert_eq!(
            err,
            "no image \"nope\" for x86_64 in the catalog; known: debian-13"
        );
    }

    #[test]
    fn bad_catalogs_are_named_with_a_position() {
        let p = Path::new("/m/cat.toml");
        let entry = |extra: &str| {
            format!(
                "[[image]]\nname='a'\nrelease='b'\narch='x86_64'\nurl='http://h/f'\nsums_url='http://h/S'\nfile='f'\n{extra}"
            )
        };
        assert!(parse(&entry(""), p).is_ok());
        let err = parse(&entry("flavor='x'\n"), p).unwrap_err().to_string();
        assert!(
            err.starts_with("/m/cat.toml:8:1: unknown field `flavor`"),
            "{err}"
        );
        for (from, to, needle) in [
            ("arch='x86_64'", "arch='mips'", "arch \"mips\""),
            ("url='http://h/f'", "url='ftp://h/f'", "url \"ftp://h/f\""),
            ("sums_url='http://h/S'", "sums_url='S'", "sums_url \"S\""),
            ("file='f'", "file='../f'", "plain file name"),
            ("name='a'", "name='a b'", "name must be"),
        ] {
            let err = parse(&entry("").replace(from, to), p)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
            assert!(err.starts_with("/m/cat.toml: image "), "{err}");
        }
    }
}
