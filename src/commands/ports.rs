//! `vibebox ports [--json]`: which guest ports this project's VM has on the host's
//! loopback right now.

use std::path::Path;

use super::Error;
use crate::paths::Home;
use crate::session::project;
use crate::supervisor::{self, State, ports};

pub fn run(home: &Home, start: &Path, json: bool) -> Result<(), Error> {
    // Through the index, never the project's marker: the guest can write that.
    let root = project::find_root(start, home)?;
    let id = project::registered(home, &root)?
        .ok_or_else(|| Error::Usage(format!("{} has no vibebox session", root.display())))?;
    let sd = home.session(id);
    let running = supervisor::status(&sd).state == State::Running;
    let published = if running {
        ports::read(&sd)
    } else {
        Vec::new()
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&published).expect("plain data serialises")
        );
        return Ok(());
    }
    if !running {
        println!("the VM is not running: nothing is published");
        return Ok(());
    }
    if published.is_empty() {
        println!("nothing is published (a port a process in the VM listens on appears here)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = published
        .iter()
        .map(|p| {
            vec![
                format!("localhost:{}", p.host),
                format!("VM:{}", p.guest),
                p.how.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(&["HOST", "GUEST", "FROM"], &rows, None)
    );
    Ok(())
}
