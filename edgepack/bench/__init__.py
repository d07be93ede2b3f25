"""Per-device benchmarks: host, emulated aarch64 (qemu-user) and real boards over ssh."""
