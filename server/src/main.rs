//! `server` — placeholder binary; the streaming overlay arrives in a later issue.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the server is not implemented yet (see the project's issues)")
}
