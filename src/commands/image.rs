//! `vibebox image build|pull|list|rm`.

use std::io::Write;

use serde_json::json;

use super::Error;
use crate::cli::ImageCommand;
use crate::image::build::{self, Options};
use crate::image::pull;
use crate::image::store::{self, Image, Store};
use crate::paths::Home;
use crate::store::index::Index;

pub fn run(home: &Home, cmd: &ImageCommand) -> Result<(), Error> {
    match cmd {
        ImageCommand::Build { release, arch } => {
            let opts = Options {
                release: release.clone(),
                arch: match arch {
                    Some(a) => a.clone(),
                    None => crate::image::guest_arch()?.to_string(),
                },
                ..Options::default()
            };
            let (image, built) = build::build(home, &opts)?;
            report(&image, built, "built")
        }
        ImageCommand::Pull { name, arch } => {
            let arch = match arch {
                Some(a) => a.as_str(),
                None => crate::image::guest_arch()?,
            };
            let (image, made) = pull::pull(home, name.as_deref(), arch)?;
            report(&image, made, "pulled")
        }
        ImageCommand::List { json } => list(home, *json),
        ImageCommand::Rm { name } => rm(home, name),
    }
}

/// `<verb> <id> (<dir>)`, or `<id> is already <verb> (<dir>)` when it was reused:
/// the last line is what scripts (and `.ci/run`) read.
fn report(image: &Image, made: bool, verb: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    if made {
        writeln!(out, "{verb} {} ({})", image.id(), image.dir.display())?;
    } else {
        writeln!(
            out,
            "{} is already {verb} ({})",
            image.id(),
            image.dir.display()
        )?;
    }
    Ok(())
}

fn users(index: &Index, home: &Home, image: &Image) -> Result<Vec<(String, String)>, Error> {
    let ids: Vec<_> = index.entries().iter().map(|e| e.id).collect();
    let using = store::sessions_using(home, image, &ids);
    Ok(index
        .entries()
        .iter()
        .filter(|e| using.contains(&e.id))
        .map(|e| (e.id.to_string(), e.directory.display().to_string()))
        .collect())
}

fn list(home: &Home, as_json: bool) -> Result<(), Error> {
    let images = Store::new(home).list()?;
    let mut out = std::io::stdout().lock();
    let index = Index::snapshot(home)?;
    let mut rows = Vec::new();
    for img in &images {
        rows.push((img, users(&index, home, img)?.len()));
    }
    if as_json {
        let items: Vec<_> = rows
            .iter()
            .map(|(i, used)| {
                json!({
                    "name": i.id(),
                    "short_name": i.manifest.name,
                    "arch": i.manifest.arch,
                    "release": i.manifest.release,
                    "size_bytes": i.size(),
                    "created": i.manifest.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "used_by": used,
                    "source": i.manifest.source,
                    "path": i.dir,
                })
            })
            .collect();
        return super::write_json(&mut out, &items);
    }
    if rows.is_empty() {
        writeln!(
            out,
            "No images yet. `vibebox image pull` gets one (or `vibebox image build` on Linux); `vibebox` gets one by itself when a session needs it."
        )?;
        return Ok(());
    }
    let now = chrono::Utc::now();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(i, used)| {
            vec![
                i.id(),
                i.manifest.arch.clone(),
                i.manifest.release.clone(),
                format!("{:.1} GiB", i.size() as f64 / (1u64 << 30) as f64),
                super::list::relative_time(i.manifest.created, now),
                format!("{used} session{}", if *used == 1 { "" } else { "s" }),
            ]
        })
        .collect();
    let headers = ["NAME", "ARCH", "RELEASE", "SIZE", "CREATED", "USED BY"];
    write!(out, "{}", super::table::render(&headers, &table, None))?;
    Ok(())
}

fn rm(home: &Home, name: &str) -> Result<(), Error> {
    let store = Store::new(home);
    let images = store.list()?;
    let matches: Vec<&Image> = images
        .iter()
        .filter(|i| i.id() == name || i.manifest.name == name)
        .collect();
    let image = match matches.as_slice() {
        [one] => *one,
        [] => {
            return Err(Error::Usage(format!(
                "no image named {name:?}; `vibebox image list` shows them"
            )));
        }
        many => {
            return Err(Error::Usage(format!(
                "{name:?} names {} images ({}); give the full name",
                many.len(),
                many.iter().map(|i| i.id()).collect::<Vec<_>>().join(", ")
            )));
        }
    };
    // Under the index lock, so no session is registered between the check and the
    // removal.
    let index = Index::open(home)?;
    let using = users(&index, home, image)?;
    if !using.is_empty() {
        return Err(Error::InUse(format!(
            "image {} is used by {}; delete those sessions first (`vibebox delete <id>`)",
            image.id(),
            using
                .iter()
                .map(|(id, dir)| format!("session {id} ({dir})"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    store.remove(image)?;
    drop(index);
    writeln!(std::io::stdout().lock(), "removed image {}", image.id())?;
    Ok(())
}
