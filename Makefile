# Thin entry points; the logic lives in scripts/ and bed/.
.PHONY: test demo bed-build bed-up bed-down lint

test:       ## every check and test, against a real bed it brings up and takes down
	scripts/test

demo:       ## bring the bed up and show it working; leaves it up
	scripts/demo

bed-build:  ## build and cache the bed's Go binaries
	bed/build.sh

bed-up:
	bed/up.sh

bed-down:
	bed/down.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
