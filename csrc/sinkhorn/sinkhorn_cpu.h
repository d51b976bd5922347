// The instruction sets of the CPU Sinkhorn kernel, for selfboottok._C's Python module.
#pragma once

#include <string>
#include <vector>

namespace sbt {
namespace sinkhorn {

// The instruction sets that selfboottok::sinkhorn_kernel has code for and this CPU runs, best
// last: "generic" (any x86-64 or other CPU), "avx2" (AVX2 + FMA), "avx512" (AVX-512F).
std::vector<std::string> cpu_isas();

// The one it uses now: SELFBOOTTOK_CPU_ISA when set (generic | avx2 | avx512; "auto" or empty:
// unset), else the best of cpu_isas(). An unknown name is a ValueError; one this CPU or build
// lacks, a RuntimeError.
std::string cpu_isa();

}  // namespace sinkhorn
}  // namespace sbt
