"""XLA_FLAGS for N fake CPU devices, shared by the test process and the processes it starts."""

# XLA:CPU's concurrency-optimized scheduler lets the device threads reach the collectives of a
# nested loop in different orders; on 2 cores they then wait on each other until XLA aborts the
# process (rendezvous "Termination timeout", about one run in three of a chunked, accumulated
# train step on a 2x2x2 mesh). The program-order schedule keeps every device in step.
#
# The tests' programs are small and most of their time is compiling: LLVM's optimization level 0
# cuts a fifth of the suite. XLA's own passes are the same; only LLVM's machine code is less
# optimized. No figure under experiments/results is measured with these flags.
_FLAGS = ("--xla_force_host_platform_device_count={} "
          "--xla_cpu_enable_concurrency_optimized_scheduler=false")
_FAST_COMPILE = " --xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
  """fast_compile=False: compile as users do (a test of compile times, e.g. the cache's
  threshold, must not see programs compiled faster than users' are)."""
  return _FLAGS.format(devices) + (_FAST_COMPILE if fast_compile else "")
