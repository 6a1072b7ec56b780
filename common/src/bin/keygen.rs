//! `keygen` — creates or shows Pessi Streamer key files.
//!
//! ```text
//! keygen                    this machine's default network key (created if missing)
//! keygen FILE               a host key file: created if missing; prints its public key
//! keygen --network FILE     a network key file (created if missing)
//! keygen --secret FILE      a viewer secret file for PoPs' and clients' --viewer-key
//! keygen --public FILE      only print the public key of a host key file (must exist)
//! ```
//!
//! Files are 64 hex digits and a newline, mode 0600. The hosts create their own files on first
//! use; this is for preparing keys on another machine, pinning them in a topology (`[keys]`),
//! or giving clients a PoP's key (`--servers IP#KEY`).

use anyhow::Context;
use common::keys::{self, KeyPair};
use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: keygen [FILE | --network FILE | --secret FILE | --public FILE]\n\
         Creates (or shows) a key file; a host key file prints its public key."
    );
    std::process::exit(2)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, path) = match args.as_slice() {
        [] => ("--network", keys::default_network_key()),
        [f] if !f.starts_with('-') => ("host", PathBuf::from(f)),
        [m, f] if ["--network", "--secret", "--public"].contains(&m.as_str()) => {
            (m.as_str(), PathBuf::from(f))
        }
        _ => usage(),
    };
    if mode == "--public" {
        let private = keys::load(&path)?;
        println!("{}", KeyPair::from_private(private).public);
        return Ok(());
    }
    let (secret, created) = keys::load_or_create(&path)
        .with_context(|| format!("cannot create or read {}", path.display()))?;
    let what = if created { "created" } else { "exists" };
    match mode {
        "host" => {
            println!("{}", KeyPair::from_private(secret).public);
            eprintln!(
                "{what}: {} (host key; the line above is its public key: pin it in the \
                 topology's [keys], or give it to clients as --servers IP#KEY)",
                path.display()
            );
        }
        "--network" => eprintln!(
            "{what}: {} (network key: copy this file to every host and to the bootstrapper, \
             --network-key)",
            path.display()
        ),
        _ => eprintln!(
            "{what}: {} (viewer secret: a PoP's --viewer-key; give the same file to its \
             viewers' clients, --viewer-key)",
            path.display()
        ),
    }
    Ok(())
}
