//! bpf(2) for the cgroup v2 device filter. (cgroup helper fills this in.)
