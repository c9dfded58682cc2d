package cudakern

import (
	"errors"
	"fmt"
)

// Sentinel errors; callers map them with errors.Is.
var (
	// ErrLibraryNotFound: a CUDA library (libcuda, libnvrtc, libcublasLt) is not installed
	// where cudakern looks. The error's text names the library and the folders searched.
	ErrLibraryNotFound = errors.New("library not found")
	// ErrSymbolNotFound: a library is there but too old for an entry point cudakern needs.
	ErrSymbolNotFound = errors.New("symbol not found")
	// ErrNoDevice: the driver loaded but sees no CUDA device (or the ordinal is out of range).
	ErrNoDevice = errors.New("no CUDA device")
	// ErrOutOfMemory: a device or pinned host allocation failed for lack of memory.
	ErrOutOfMemory = errors.New("out of memory")
	// ErrCompile: NVRTC rejected a kernel source; the error carries its log.
	ErrCompile = errors.New("kernel compilation failed")
	// ErrUnsupportedArch: NVRTC cannot generate code the device can run.
	ErrUnsupportedArch = errors.New("architecture not supported by NVRTC")
	// ErrLaunch: a launch was refused before reaching the driver (argument list or
	// configuration that does not match the kernel).
	ErrLaunch = errors.New("invalid kernel launch")
)

// CUDA driver result codes cudakern names itself (the driver's cuGetErrorName covers the
// rest when it is loaded).
const (
	cudaSuccess             = 0
	cudaErrorInvalidValue   = 1
	cudaErrorOutOfMemory    = 2
	cudaErrorNotInitialized = 3
	cudaErrorNoDevice       = 100
	cudaErrorInvalidDevice  = 101
	cudaErrorNotReady       = 600
)

var cuResultNames = map[int32]string{
	0:   "CUDA_SUCCESS",
	1:   "CUDA_ERROR_INVALID_VALUE",
	2:   "CUDA_ERROR_OUT_OF_MEMORY",
	3:   "CUDA_ERROR_NOT_INITIALIZED",
	4:   "CUDA_ERROR_DEINITIALIZED",
	34:  "CUDA_ERROR_STUB_LIBRARY",
	35:  "CUDA_ERROR_INSUFFICIENT_DRIVER",
	46:  "CUDA_ERROR_DEVICE_UNAVAILABLE",
	100: "CUDA_ERROR_NO_DEVICE",
	101: "CUDA_ERROR_INVALID_DEVICE",
	200: "CUDA_ERROR_INVALID_IMAGE",
	201: "CUDA_ERROR_INVALID_CONTEXT",
	209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
	218: "CUDA_ERROR_INVALID_PTX",
	222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
	400: "CUDA_ERROR_INVALID_HANDLE",
	500: "CUDA_ERROR_NOT_FOUND",
	600: "CUDA_ERROR_NOT_READY",
	700: "CUDA_ERROR_ILLEGAL_ADDRESS",
	701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
	702: "CUDA_ERROR_LAUNCH_TIMEOUT",
	719: "CUDA_ERROR_LAUNCH_FAILED",
	801: "CUDA_ERROR_NOT_SUPPORTED",
	900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
	901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
	999: "CUDA_ERROR_UNKNOWN",
}

// Error is a failed CUDA driver, NVRTC or cuBLASLt call.
type Error struct {
	Call string // the C entry point, e.g. "cuMemAlloc"
	Code int32  // its result code
	Name string // the code's symbolic name, e.g. "CUDA_ERROR_OUT_OF_MEMORY"
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s (%d)", e.Call, e.Name, e.Code)
}

// Is maps result codes onto the sentinels: errors.Is(err, ErrOutOfMemory) holds for
// CUDA_ERROR_OUT_OF_MEMORY, NVRTC_ERROR_OUT_OF_MEMORY and CUBLAS_STATUS_ALLOC_FAILED.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrOutOfMemory:
		return e.Name == "CUDA_ERROR_OUT_OF_MEMORY" || e.Name == "NVRTC_ERROR_OUT_OF_MEMORY" || e.Name == "CUBLAS_STATUS_ALLOC_FAILED"
	case ErrNoDevice:
		return e.Name == "CUDA_ERROR_NO_DEVICE" || e.Name == "CUDA_ERROR_INVALID_DEVICE"
	case ErrCompile:
		return e.Name == "NVRTC_ERROR_COMPILATION"
	}
	return false
}

// cuResultName names a driver result code from cudakern's own table.
func cuResultName(code int32) string {
	if n, ok := cuResultNames[code]; ok {
		return n
	}
	return fmt.Sprintf("CUresult(%d)", code)
}
