#include "textflag.h"

// func sumSquaresAVX512(x *float32, n int) float64
// Σ float64(x[i])² for i < n, n a positive multiple of 16: two chains of 8 float64 lanes
// (squares of float32 values are exact in float64), then the lanes pairwise.
TEXT ·sumSquaresAVX512(SB), NOSPLIT, $0-24
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VXORPD Z0, Z0, Z0
	VXORPD Z1, Z1, Z1

ssloop:
	VCVTPS2PD (SI), Z2
	VCVTPS2PD 32(SI), Z3
	VFMADD231PD Z2, Z2, Z0
	VFMADD231PD Z3, Z3, Z1
	ADDQ $64, SI
	SUBQ $16, CX
	JNZ  ssloop

	VADDPD Z1, Z0, Z0
	VEXTRACTF64X4 $1, Z0, Y1
	VADDPD Y1, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPD X1, X0, X0
	VPERMILPD $1, X0, X1
	VADDSD X1, X0, X0
	VMOVSD X0, ret+16(FP)
	VZEROUPPER
	RET

// func scaleAVX512(out, x, w *float32, inv float32, n int, add bool)
// out[i] = w[i]·(x[i]·inv) for i < n (with add, out[i] + that), n a positive multiple of 16:
// the same operations as the scalar loop, 16 lanes at a time.
TEXT ·scaleAVX512(SB), NOSPLIT, $0-41
	MOVQ out+0(FP), DI
	MOVQ x+8(FP), SI
	MOVQ w+16(FP), DX
	VBROADCASTSS inv+24(FP), Z0
	MOVQ n+32(FP), CX
	MOVBLZX add+40(FP), AX
	TESTQ AX, AX
	JNZ  addloop

scaleloop:
	VMULPS (SI), Z0, Z1
	VMULPS (DX), Z1, Z1
	VMOVUPS Z1, (DI)
	ADDQ $64, SI
	ADDQ $64, DX
	ADDQ $64, DI
	SUBQ $16, CX
	JNZ  scaleloop
	VZEROUPPER
	RET

addloop:
	VMULPS (SI), Z0, Z1
	VMULPS (DX), Z1, Z1
	VADDPS (DI), Z1, Z1
	VMOVUPS Z1, (DI)
	ADDQ $64, SI
	ADDQ $64, DX
	ADDQ $64, DI
	SUBQ $16, CX
	JNZ  addloop
	VZEROUPPER
	RET
