/// mimalloc: the audit path allocates many short-lived strings; glibc malloc
/// spent about 45% of the recorder benchmark in malloc/free (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    loopgate::cli::main()
}
