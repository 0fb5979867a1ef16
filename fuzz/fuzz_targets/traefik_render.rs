#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bluegreen_fuzz::traefik_render(data));
