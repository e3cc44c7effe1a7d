//! Assembles a WebAssembly text file: `cargo run -p rill-node --example wat2wasm IN.wat OUT.wasm`.
//! `functions/build-examples` uses it to rebuild the committed example modules.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = &args[..] else { return Err("usage: wat2wasm IN.wat OUT.wasm".into()) };
    std::fs::write(output, wat::parse_file(input)?)?;
    Ok(())
}
