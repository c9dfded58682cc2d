package engine

import "errors"

// Errors callers map: ErrInvalidRequest (HTTP 400) wraps every reason a request is refused;
// ErrInvalidOptions a bad engine configuration; ErrStopped a request cut short because the
// engine's Run ended; ErrClosed a Submit after Run ended.
var (
	ErrInvalidRequest = errors.New("invalid request")
	ErrInvalidOptions = errors.New("invalid engine options")
	ErrStopped        = errors.New("engine stopped")
	ErrClosed         = errors.New("engine closed")
)
