"""Faults an operator meets, made real for a child process: `file_size_limit(n)` is a preexec_fn under
which every write past n bytes of one file fails with EFBIG ("File too large"), the way a full disk
fails writes with ENOSPC: at the OS level, mid-write, inside C++ writers (torch.save) as well."""
import resource
import signal


def file_size_limit(nbytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit
