# Thin entry points; the logic lives in scripts/ and bed/.
.PHONY: test demo bed-build bed-up bed-down lint check-chart check-advisories manifests e2e-kind

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

check-chart: ## helm lint, kubeconform -strict, rendered manifests up to date, shellcheck
	scripts/check-chart

check-advisories: ## cargo deny check advisories (needs GitHub for the RustSec database; not in `test`)
	scripts/check-advisories

manifests:  ## re-render manifests/rendered/ from the Helm chart
	scripts/render-manifests

e2e-kind:   ## the chart on a kind cluster, everything built offline (needs root for Docker; not in make test)
	scripts/e2e-kind
