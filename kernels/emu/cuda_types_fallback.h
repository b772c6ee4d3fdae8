// The few CUDA types the emulator and the kernels use, for hosts without the
// CUDA headers (a build with no nvcc and no CUDA_HOME): uint3, dim3, and
// __half / __nv_bfloat16 as 16-bit storage with round-to-nearest-even
// conversions. With the headers present, cuda_emu.h uses the real ones.
#pragma once

#include <cstdint>
#include <cstring>

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

/// IEEE binary16, as stored.
struct __half {
    uint16_t bits;
};

/// bfloat16, as stored.
struct __nv_bfloat16 {
    uint16_t bits;
};

namespace platypus_emu_fallback {
inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace platypus_emu_fallback

inline float __half2float(__half h) {
    using namespace platypus_emu_fallback;
    const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
    const uint32_t e = (h.bits >> 10) & 0x1fu;
    const uint32_t m = h.bits & 0x3ffu;
    if (e == 0) {  // zero or subnormal: m * 2^-24, exact in f32
        const float v = static_cast<float>(m) * 0x1p-24f;
        return sign ? -v : v;
    }
    if (e == 31) return float_of(sign | 0x7f800000u | (m << 13));  // inf, NaN
    return float_of(sign | ((e + 112) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
    using namespace platypus_emu_fallback;
    const uint32_t x = bits_of(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
    if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
    if (ax <= 0x33000000u) return __half{sign};                                  // <= 2^-25: zero
    const uint32_t e = ax >> 23;
    uint32_t h, rem, halfway;
    if (e < 113) {  // half subnormal: units of 2^-24
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;
        h = m >> shift;
        rem = m & ((1u << shift) - 1);
        halfway = 1u << (shift - 1);
    } else {
        h = ((e - 112) << 10) | ((ax >> 13) & 0x3ffu);
        rem = ax & 0x1fffu;
        halfway = 0x1000u;
    }
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // a carry into the exponent is correct
    return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return platypus_emu_fallback::float_of(uint32_t(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t x = platypus_emu_fallback::bits_of(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};  // quiet NaN
    return __nv_bfloat16{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
