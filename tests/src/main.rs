//! The node binary under end-to-end test: the same code as `rill` (`rill_node::cli`), built
//! in this package so that its tests can name it with `CARGO_BIN_EXE_rill-e2e`.
fn main() -> std::process::ExitCode {
    rill_node::cli::main()
}
