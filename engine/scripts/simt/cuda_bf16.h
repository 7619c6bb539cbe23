// Stand-in for the bf16 header when the kernels are checked on the CPU (not used by them there).
#pragma once
struct __nv_bfloat16 { unsigned short x; };
struct __nv_bfloat162 { __nv_bfloat16 a, b; };
