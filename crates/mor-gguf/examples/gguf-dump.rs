//! Print a GGUF file's metadata and tensor directory; with tensor names, also the first values
//! and the sum of each dequantised tensor.
//!
//!   cargo run -p mor-gguf --example gguf-dump -- FILE.gguf [TENSOR...]
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or_else(|| anyhow::anyhow!("usage: gguf-dump FILE.gguf [TENSOR...]"))?;
    let g = mor_gguf::GgufFile::open(path)?;
    if args.len() == 1 {
        println!("GGUF v{} alignment {} data at {}", g.version, g.alignment, g.data_offset);
        for (k, v) in &g.metadata {
            println!("{k} = {v}");
        }
        for t in &g.tensors {
            println!("{} {:?} {:?} @{}", t.name, t.ty, t.dims, t.offset);
        }
    }
    for name in &args[1..] {
        let v = g.dequantize(name)?;
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        println!("{name} n={} sum={sum:.6} first={:?}", v.len(), &v[..v.len().min(8)]);
    }
    Ok(())
}
