//! `bluegreen-haproxy`: not implemented yet (see the open issue for this backend).
#![forbid(unsafe_code)]
