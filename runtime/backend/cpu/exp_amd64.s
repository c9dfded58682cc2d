#include "textflag.h"

#define BCAST(bits, reg) MOVL $bits, AX; VPBROADCASTD AX, reg

// REDUCE16(dst) sums each of Z0..Z15 across its 16 lanes (transposed: shuffles and adds),
// leaving the 16 sums in dst in order (Z31 holds the final permutation; Z16, Z17 are scratch).
#define REDUCE16(dst) \
	VSHUFF32X4 $0x44, Z1, Z0, Z16; \
	VSHUFF32X4 $0xEE, Z1, Z0, Z17; \
	VADDPS Z17, Z16, Z0; \
	VSHUFF32X4 $0x44, Z3, Z2, Z16; \
	VSHUFF32X4 $0xEE, Z3, Z2, Z17; \
	VADDPS Z17, Z16, Z1; \
	VSHUFF32X4 $0x44, Z5, Z4, Z16; \
	VSHUFF32X4 $0xEE, Z5, Z4, Z17; \
	VADDPS Z17, Z16, Z2; \
	VSHUFF32X4 $0x44, Z7, Z6, Z16; \
	VSHUFF32X4 $0xEE, Z7, Z6, Z17; \
	VADDPS Z17, Z16, Z3; \
	VSHUFF32X4 $0x44, Z9, Z8, Z16; \
	VSHUFF32X4 $0xEE, Z9, Z8, Z17; \
	VADDPS Z17, Z16, Z4; \
	VSHUFF32X4 $0x44, Z11, Z10, Z16; \
	VSHUFF32X4 $0xEE, Z11, Z10, Z17; \
	VADDPS Z17, Z16, Z5; \
	VSHUFF32X4 $0x44, Z13, Z12, Z16; \
	VSHUFF32X4 $0xEE, Z13, Z12, Z17; \
	VADDPS Z17, Z16, Z6; \
	VSHUFF32X4 $0x44, Z15, Z14, Z16; \
	VSHUFF32X4 $0xEE, Z15, Z14, Z17; \
	VADDPS Z17, Z16, Z7; \
	VSHUFF32X4 $0x88, Z1, Z0, Z16; \
	VSHUFF32X4 $0xDD, Z1, Z0, Z17; \
	VADDPS Z17, Z16, Z0; \
	VSHUFF32X4 $0x88, Z3, Z2, Z16; \
	VSHUFF32X4 $0xDD, Z3, Z2, Z17; \
	VADDPS Z17, Z16, Z1; \
	VSHUFF32X4 $0x88, Z5, Z4, Z16; \
	VSHUFF32X4 $0xDD, Z5, Z4, Z17; \
	VADDPS Z17, Z16, Z2; \
	VSHUFF32X4 $0x88, Z7, Z6, Z16; \
	VSHUFF32X4 $0xDD, Z7, Z6, Z17; \
	VADDPS Z17, Z16, Z3; \
	VUNPCKLPD Z1, Z0, Z16; \
	VUNPCKHPD Z1, Z0, Z17; \
	VADDPS Z17, Z16, Z0; \
	VUNPCKLPD Z3, Z2, Z16; \
	VUNPCKHPD Z3, Z2, Z17; \
	VADDPS Z17, Z16, Z1; \
	VSHUFPS $0x88, Z1, Z0, Z16; \
	VSHUFPS $0xDD, Z1, Z0, Z17; \
	VADDPS Z17, Z16, Z2; \
	VPERMPS Z2, Z31, dst


// func expShiftAVX512(s *float32, n int, mx float32) float32
// s[i] = e^(s[i]-mx) for i < n, n a positive multiple of 16; returns Σ s[i] (16 lane sums,
// then the lanes pairwise). The algorithm of expf (exp.go), 16 lanes at a time: the argument
// is clamped to [ln 2^-126, ln MaxFloat32] (so tiny results are ~1.2e-38 rather than 0), n is
// rounded to nearest even, and VSCALEFPS applies 2^n.
TEXT ·expShiftAVX512(SB), NOSPLIT, $0-28
	MOVQ s+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS mx+16(FP), Z1
	BCAST(0xc2aeac50, Z5)  // lo
	BCAST(0x42b17218, Z6)  // hi
	BCAST(0x3fb8aa3b, Z7)  // log2e
	BCAST(0x3f318000, Z8)  // ln2hi
	BCAST(0xb95e8083, Z9)  // ln2lo
	BCAST(0x39506967, Z10) // c0
	BCAST(0x3ab743ce, Z11) // c1
	BCAST(0x3c088908, Z12) // c2
	BCAST(0x3d2aa9c1, Z13) // c3
	BCAST(0x3e2aaaaa, Z14) // c4
	BCAST(0x3f000000, Z15) // c5
	BCAST(0x3f800000, Z16) // 1
	VPXORD Z17, Z17, Z17   // sum
	XORQ AX, AX

exploop:
	VMOVUPS (SI)(AX*4), Z0
	VSUBPS Z1, Z0, Z0
	VMAXPS Z5, Z0, Z0
	VMINPS Z6, Z0, Z0
	VMULPS Z7, Z0, Z2
	VRNDSCALEPS $0, Z2, Z2
	VFNMADD231PS Z8, Z2, Z0
	VFNMADD231PS Z9, Z2, Z0
	VMOVAPS Z10, Z3
	VFMADD213PS Z11, Z0, Z3
	VFMADD213PS Z12, Z0, Z3
	VFMADD213PS Z13, Z0, Z3
	VFMADD213PS Z14, Z0, Z3
	VFMADD213PS Z15, Z0, Z3
	VMULPS Z0, Z0, Z4
	VFMADD213PS Z0, Z4, Z3
	VADDPS Z16, Z3, Z3
	VSCALEFPS Z2, Z3, Z3
	VMOVUPS Z3, (SI)(AX*4)
	VADDPS Z3, Z17, Z17
	ADDQ $16, AX
	CMPQ AX, CX
	JLT  exploop

	VEXTRACTF64X4 $1, Z17, Y0
	VADDPS Y0, Y17, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VHADDPS X0, X0, X0
	VHADDPS X0, X0, X0
	VMOVSS X0, ret+24(FP)
	VZEROUPPER
	RET

// laneIdx puts the transposed sums of laneSums16's 16-vector blocks back in order: lane i
// comes from lane 4·(i mod 4) + i/4.
DATA laneIdx<>+0(SB)/4, $0
DATA laneIdx<>+4(SB)/4, $4
DATA laneIdx<>+8(SB)/4, $8
DATA laneIdx<>+12(SB)/4, $12
DATA laneIdx<>+16(SB)/4, $1
DATA laneIdx<>+20(SB)/4, $5
DATA laneIdx<>+24(SB)/4, $9
DATA laneIdx<>+28(SB)/4, $13
DATA laneIdx<>+32(SB)/4, $2
DATA laneIdx<>+36(SB)/4, $6
DATA laneIdx<>+40(SB)/4, $10
DATA laneIdx<>+44(SB)/4, $14
DATA laneIdx<>+48(SB)/4, $3
DATA laneIdx<>+52(SB)/4, $7
DATA laneIdx<>+56(SB)/4, $11
DATA laneIdx<>+60(SB)/4, $15
GLOBL laneIdx<>(SB), RODATA|NOPTR, $64

// func laneSums16(dst *float32, src *float32, n int)
// dst[i] = laneSum(src[16i : 16i+16]) for i < n, n > 0, bit for bit: lane l plus lane l+8,
// then l+4, then (c0+c2)+(c1+c3). Blocks of 16 vectors are reduced transposed, each shuffle
// and add serving several outputs at once: level 1 pairs the 256-bit halves of two vectors,
// level 2 the 128-bit quarters of two of those, level 3 the 64-bit pairs, level 4 the lanes;
// the rest one vector at a time.
TEXT ·laneSums16(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	VMOVUPS laneIdx<>(SB), Z31
	CMPQ CX, $16
	JLT  sumone

sumblock:
	VMOVUPS 0(SI), Z0
	VMOVUPS 64(SI), Z1
	VMOVUPS 128(SI), Z2
	VMOVUPS 192(SI), Z3
	VMOVUPS 256(SI), Z4
	VMOVUPS 320(SI), Z5
	VMOVUPS 384(SI), Z6
	VMOVUPS 448(SI), Z7
	VMOVUPS 512(SI), Z8
	VMOVUPS 576(SI), Z9
	VMOVUPS 640(SI), Z10
	VMOVUPS 704(SI), Z11
	VMOVUPS 768(SI), Z12
	VMOVUPS 832(SI), Z13
	VMOVUPS 896(SI), Z14
	VMOVUPS 960(SI), Z15
	REDUCE16(Z3)
	VMOVUPS Z3, (DI)
	ADDQ $1024, SI
	ADDQ $64, DI
	SUBQ $16, CX
	CMPQ CX, $16
	JGE  sumblock
	TESTQ CX, CX
	JZ   sumdone

sumone:
	VMOVUPS (SI), Z0
	VEXTRACTF64X4 $1, Z0, Y1
	VADDPS Y1, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VMOVHLPS X0, X0, X1
	VADDPS X1, X0, X0
	VMOVSHDUP X0, X1
	VADDSS X1, X0, X0
	VMOVSS X0, (DI)
	ADDQ $64, SI
	ADDQ $4, DI
	DECQ CX
	JNZ  sumone

sumdone:
	VZEROUPPER
	RET

// func attnScoresAVX512(q *float32, k *float32, stride int, n int, hd int, scale float32, out *float32) float32
// out[p] = scale·Σ_d q[d]·k[p·stride/4 + d] for p < n, returning the largest; stride in bytes,
// n > 0, hd a positive multiple of 16. Each dot is 16 FMA lanes summed in laneSum's order:
// 16 positions at a time with laneSums16's transposed reduction, the rest one at a time (the
// same sums either way).
TEXT ·attnScoresAVX512(SB), NOSPLIT, $0-60
	MOVQ q+0(FP), SI
	MOVQ k+8(FP), DI
	MOVQ stride+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ hd+32(FP), DX
	VMOVSS scale+40(FP), X3
	VBROADCASTSS scale+40(FP), Z22
	MOVQ out+48(FP), R8
	MOVL $0xff800000, AX
	VMOVD AX, X4
	VPBROADCASTD AX, Z21
	VMOVUPS laneIdx<>(SB), Z31
	CMPQ CX, $16
	JLT  scoreloop

scoreblock:
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	VPXORD Z9, Z9, Z9
	VPXORD Z10, Z10, Z10
	VPXORD Z11, Z11, Z11
	VPXORD Z12, Z12, Z12
	VPXORD Z13, Z13, Z13
	VPXORD Z14, Z14, Z14
	VPXORD Z15, Z15, Z15
	XORQ AX, AX
scoreblockdim:
	VMOVUPS (SI)(AX*4), Z20
	MOVQ DI, R9
	VFMADD231PS (R9)(AX*4), Z20, Z0
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z1
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z2
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z3
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z4
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z5
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z6
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z7
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z8
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z9
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z10
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z11
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z12
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z13
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z14
	ADDQ BX, R9
	VFMADD231PS (R9)(AX*4), Z20, Z15
	ADDQ $16, AX
	CMPQ AX, DX
	JLT  scoreblockdim
	REDUCE16(Z2)
	VMULPS Z22, Z2, Z2
	VMOVUPS Z2, (R8)
	VMAXPS Z2, Z21, Z21
	ADDQ $64, R8
	MOVQ BX, AX
	SHLQ $4, AX
	ADDQ AX, DI
	SUBQ $16, CX
	CMPQ CX, $16
	JGE  scoreblock
	VEXTRACTF64X4 $1, Z21, Y0
	VMAXPS Y0, Y21, Y0
	VEXTRACTF128 $1, Y0, X1
	VMAXPS X1, X0, X0
	VMOVHLPS X0, X0, X1
	VMAXPS X1, X0, X0
	VMOVSHDUP X0, X1
	VMAXSS X1, X0, X0
	VMOVAPS X0, X4 // the blocks used Z3 and Z4: restore the scale and running maximum
	VMOVSS scale+40(FP), X3
	TESTQ CX, CX
	JZ   scoredone

scoreloop:
	VPXORD Z0, Z0, Z0
	XORQ AX, AX

scoredim:
	VMOVUPS (SI)(AX*4), Z1
	VFMADD231PS (DI)(AX*4), Z1, Z0
	ADDQ $16, AX
	CMPQ AX, DX
	JLT  scoredim

	VEXTRACTF64X4 $1, Z0, Y1
	VADDPS Y1, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VMOVHLPS X0, X0, X1
	VADDPS X1, X0, X0
	VMOVSHDUP X0, X1
	VADDSS X1, X0, X0
	VMULSS X3, X0, X0
	VMOVSS X0, (R8)
	VMAXSS X0, X4, X4
	ADDQ $4, R8
	ADDQ BX, DI
	DECQ CX
	JNZ  scoreloop

scoredone:
	VMOVSS X4, ret+56(FP)
	VZEROUPPER
	RET

// func attnMixAVX512(out *float32, w *float32, inv float32, v *float32, stride int, n int, hd int, add bool)
// out[d] = Σ_p (w[p]·inv)·v[p·stride/4 + d] for d < hd (with add, out[d] + that sum, the even
// chain starting at out[d]); stride in bytes, n > 0, hd a positive multiple of 16. Two
// accumulator chains (even and odd p) hide the FMA latency.
TEXT ·attnMixAVX512(SB), NOSPLIT, $0-57
	MOVQ out+0(FP), DI
	MOVQ w+8(FP), R8
	VBROADCASTSS inv+16(FP), Z5
	MOVQ v+24(FP), SI
	MOVQ stride+32(FP), BX
	MOVQ n+40(FP), R9
	MOVQ hd+48(FP), DX
	MOVBLZX add+56(FP), R12
	XORQ AX, AX

mixchunk:
	VPXORD Z0, Z0, Z0
	TESTQ R12, R12
	JZ   mixzero
	VMOVUPS (DI)(AX*4), Z0

mixzero:
	VPXORD Z1, Z1, Z1
	MOVQ R8, R10
	LEAQ (SI)(AX*4), R11
	MOVQ R9, CX
	CMPQ CX, $2
	JLT  mixtail

mixpair:
	VBROADCASTSS (R10), Z2
	VMULPS Z5, Z2, Z2
	VFMADD231PS (R11), Z2, Z0
	VBROADCASTSS 4(R10), Z3
	VMULPS Z5, Z3, Z3
	VFMADD231PS (R11)(BX*1), Z3, Z1
	ADDQ $8, R10
	LEAQ (R11)(BX*2), R11
	SUBQ $2, CX
	CMPQ CX, $2
	JGE  mixpair

mixtail:
	TESTQ CX, CX
	JZ   mixstore
	VBROADCASTSS (R10), Z2
	VMULPS Z5, Z2, Z2
	VFMADD231PS (R11), Z2, Z0

mixstore:
	VADDPS Z1, Z0, Z0
	VMOVUPS Z0, (DI)(AX*4)
	ADDQ $16, AX
	CMPQ AX, DX
	JLT  mixchunk

	VZEROUPPER
	RET
