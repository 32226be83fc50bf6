//! `mor presets`: the built-in preset names, one per line.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let mut text = String::new();
    for name in mor_config::preset_names() {
        text.push_str(name);
        text.push('\n');
    }
    super::print(&text)
}
