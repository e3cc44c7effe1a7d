//! The `rill` binary.
fn main() -> std::process::ExitCode {
    rill_node::cli::main()
}
