fn main() -> std::process::ExitCode {
    caremesh::cli::main()
}
