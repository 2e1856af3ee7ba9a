//! The `hutch` binary; everything lives in the library crate.

fn main() -> std::process::ExitCode {
    hutch::main()
}
