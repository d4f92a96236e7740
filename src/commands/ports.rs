//! `vibebox ports [--json]`: which guest ports this project's VM has on the host's
//! loopback right now; `vibebox ports add|rm`: change that while it runs.

use std::path::Path;

use super::Error;
use crate::cli::PortsCommand;
use crate::config::Publish;
use crate::paths::Home;
use crate::session::project;
use crate::supervisor::protocol::Op;
use crate::supervisor::{self, State, client, ports};

pub fn run(
    home: &Home,
    start: &Path,
    json: bool,
    change: Option<&PortsCommand>,
) -> Result<(), Error> {
    // Through the index, never the project's marker: the guest can write that.
    let root = project::find_root(start, home)?;
    let id = project::registered(home, &root)?
        .ok_or_else(|| Error::Usage(format!("{} has no vibebox session", root.display())))?;
    let sd = home.session(id);
    if let Some(change) = change {
        let op = match change {
            PortsCommand::Add { mapping } => {
                let p = Publish::parse(mapping).map_err(Error::Usage)?;
                Op::Publish {
                    host: p.host,
                    guest: p.guest,
                    addr: Some(p.addr),
                }
            }
            PortsCommand::Rm { mapping } => {
                let p = Publish::parse(mapping).map_err(Error::Usage)?;
                Op::Unpublish { guest: p.guest }
            }
        };
        let said = client::change_ports(&sd, op)?;
        println!("{}", crate::escape::escape(&said));
        return Ok(());
    }
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
                format!("{}:{}", p.addr, p.host),
                format!("VM:{}", p.guest),
                p.how.clone(),
                p.via.as_str().to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(&["HOST", "GUEST", "FROM", "VIA"], &rows, None)
    );
    Ok(())
}
