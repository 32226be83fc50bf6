//! Build (or find in the cache) the built-in corpus and print what `ensure` returns, timed.
//!
//!   MOR_CACHE_DIR=/tmp/fresh cargo run --release -p mor-data --example builtin
fn main() -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let b = mor_data::builtin::ensure(&Default::default())?;
    println!("{}", serde_json::to_string_pretty(&b)?);
    println!("took {:.2}s", t.elapsed().as_secs_f64());
    Ok(())
}
