//! `sanvirt`: the administrator CLI. Noun-verb commands over sanvirtd's REST
//! API (`sanvirt-admin`); every change is one configuration command there.
//!
//! Exit status: 0 done; 1 refused by sanvirtd (its message is printed,
//! nothing changed); 2 usage error; 3 sanvirtd unreachable or failed.

mod args;
mod client;
mod render;
mod run;
mod sizes;

use std::process::ExitCode;

use clap::Parser;

use crate::client::Failure;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let json = cli.json;
    match run::run(cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            report(&failure, json);
            ExitCode::from(failure.exit_code() as u8)
        }
    }
}

/// Refusals and failures on stderr: the API's error JSON with `--json`,
/// one line for people otherwise.
fn report(failure: &Failure, json: bool) {
    let (kind, message) = match failure {
        Failure::Usage(m) => ("usage", m.clone()),
        Failure::Daemon(m) => ("unavailable", m.clone()),
        Failure::Refused { body, change, .. } => {
            if json {
                eprintln!("{}", serde_json::to_string(body).unwrap_or_default());
            } else if *change {
                eprintln!("sanvirt: {} (nothing changed)", body.message);
            } else {
                eprintln!("sanvirt: {}", body.message);
            }
            return;
        }
    };
    if json {
        eprintln!("{}", serde_json::json!({"error": kind, "message": message}));
    } else {
        eprintln!("sanvirt: {message}");
    }
}
