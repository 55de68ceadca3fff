//! The `warren` command. Everything lives in the library; this only hands over the process.

fn main() -> std::process::ExitCode {
    warren_node::cli::main()
}
