# mirrorfleet — `make help` lists the targets.
CARGO ?= cargo
CRD := crds/registrymirrors.mirrorfleet.io.yaml
CRD_COPIES := config/crd/registrymirrors.mirrorfleet.io.yaml $(wildcard charts/mirrorfleet/crds)

.DEFAULT_GOAL := help
.PHONY: help build render test test-fast lint generate e2e bench

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build the mirrorfleet binary (release)
	$(CARGO) build --release --locked

render: ## Render the embedded sample fleet to ./rendered (no cluster needed)
	$(CARGO) run --release --locked -- render -o rendered

test: ## All tests: fast ones plus the real data plane (tools missing locally are skipped loudly; under CI=true they fail)
	$(CARGO) test --locked --tests -- --test-threads=2

test-fast: ## Only the fast tests (builders, CRD drift, bad input)
	$(CARGO) test --locked --lib --test crd_drift --test render_golden --test render_invariants --test invalid_specs

lint: ## rustfmt, clippy with warnings as errors, actionlint on .github/workflows (skipped loudly when missing, fails under CI=true)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	hack/actionlint.sh

generate: ## Regenerate the CRD copies and the golden files from the code
	$(CARGO) run --locked --quiet -- crd > $(CRD)
	cp $(CRD) config/crd/registrymirrors.mirrorfleet.io.yaml
	if [ -d charts/mirrorfleet/crds ]; then cp $(CRD) charts/mirrorfleet/crds/; fi
	UPDATE_GOLDEN=1 $(CARGO) test --locked --quiet --test render_golden
	UPDATE_CHART_README=1 $(CARGO) test --locked --quiet --test chart readme_values_table
	UPDATE_DOCS=1 $(CARGO) test --locked --quiet --test docs_reference

e2e: ## Cluster tests against the KUBECONFIG cluster (CRD admission; the controller end to end; node agent API watch, RBAC, annotation, Events; helm install/uninstall)
	$(CARGO) test --locked --test cluster_admission --test e2e --test agent_cluster --test chart_cluster -- --ignored --nocapture --test-threads=1

.PHONY: bench-cluster
bench-cluster: ## Controller against the KUBECONFIG cluster: create->ready median of 20, API writes over BENCH_QUIET_SECONDS (600) of quiet, RSS at 100 mirrors
	$(CARGO) bench --locked --bench cluster

.PHONY: bench-scale
bench-scale: ## Controller against the KUBECONFIG cluster at N = BENCH_SCALE_N (10,100,500) mirrors x 5 upstreams: create and update-all -> converged/Ready, CPU, peak RSS, requests by verb
	$(CARGO) bench --locked --bench cluster_scale

# The real-node tier: the k8s harness with REAL_NODE=1 and node-up.sh (see README "Tests"); source
# $$K8S_HARNESS_HOME/node/node.env first. With MIRRORFLEET_REGISTRY_V3 (a Distribution 3.x registry
# binary), the steps run a second time with a proxy image built from it.
.PHONY: e2e-node
e2e-node: image-oci ## Real-node tier: helm install, a full RegistryMirror, the node's containerd pulling through it (KUBECONFIG + node.env of the k8s harness's real node)
	$(CARGO) test --locked --test e2e_node -- --ignored --nocapture --test-threads=1
	if [ -n "$$MIRRORFLEET_REGISTRY_V3" ]; then \
	  MIRRORFLEET_E2E_NODE_PROXY=v3 $(CARGO) test --locked --test e2e_node -- --ignored --nocapture --test-threads=1; \
	else echo "e2e-node: MIRRORFLEET_REGISTRY_V3 not set: ran with the Distribution 2.8 proxy image only"; fi

.PHONY: bench-peers
bench-peers: ## Two tiers on real containerd: pull time via the peer / the mirror / the upstream, and mirror bytes of a rollout to 5 pullers with and without the peer tier (root)
	$(CARGO) test --locked --test agent_containerd -- --ignored --nocapture --exact bench_peers_pull_times_and_rollout_bytes

.PHONY: test-containerd2
test-containerd2: ## The node's containerd 2.x honours the agent's dial_timeout for the mirror and the peer (MIRRORFLEET_CONTAINERD2=/path/to/containerd, built outside the repository; root)
	@test -n "$$MIRRORFLEET_CONTAINERD2" || { echo "test-containerd2: set MIRRORFLEET_CONTAINERD2 to a containerd 2.x binary (ctr2 or ctr beside it, or MIRRORFLEET_CTR2)"; exit 1; }
	$(CARGO) test --locked --test agent_containerd -- --ignored --nocapture --test-threads=1 containerd_2_

.PHONY: e2e-faults
e2e-faults: ## Fault injection against the KUBECONFIG cluster: operator SIGKILLed 20x mid-reconcile, leader killed, hand edits, stalled watches, kube-apiserver restart (k8s harness)
	$(CARGO) test --locked --test e2e_faults -- --ignored --nocapture --test-threads=1 --skip api_server_restart
	# Last: the cluster's own controllers take a while to catch up after the restart.
	MIRRORFLEET_FAULTS_APISERVER=1 $(CARGO) test --locked --test e2e_faults -- --ignored --nocapture --test-threads=1 --exact api_server_restart

.PHONY: fuzz
FUZZ_SECONDS ?= 600
fuzz: ## Property/fuzz runs of FUZZ_SECONDS (600) each: specs the CRD admits render safely and deterministically; any YAML to render; foreign files under the node agent
	MIRRORFLEET_FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test --locked --test prop_render -- --nocapture --test-threads=2
	AGENT_FUZZ_SECONDS=$(FUZZ_SECONDS) AGENT_FUZZ_SEED=$$(date +%s) $(CARGO) test --locked --test agent_fuzz -- --nocapture --test-threads=2

.PHONY: image
IMAGE ?= ghcr.io/mirrorfleet/mirrorfleet:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image: ## Build the operator image (Dockerfile; also runs the node agent and cleanup jobs); IMAGE=... to rename
	docker build --pull -t $(IMAGE) .

# The same image without Docker: the release binary with its debug info split off (the image ships
# the stripped binary; target/image/mirrorfleet.debug keeps the symbols: `objcopy
# --add-gnu-debuglink` or gdb's `symbol-file` reads them), the shared libraries it links, CA
# certificates, user 65532, entrypoint /usr/local/bin/mirrorfleet: what the Dockerfile's distroless
# image holds (tests/image_oci.rs compares the two).
.PHONY: image-oci
image-oci: ## Build the operator image as an OCI archive with umoci (no Docker): target/image/mirrorfleet-oci.tar
	$(CARGO) build --release --locked --bin mirrorfleet
	mkdir -p target/image
	objcopy --only-keep-debug target/release/mirrorfleet target/image/mirrorfleet.debug
	objcopy --strip-all --add-gnu-debuglink=target/image/mirrorfleet.debug target/release/mirrorfleet target/image/mirrorfleet
	hack/oci-image.sh --out target/image/mirrorfleet-oci.tar --ref $(IMAGE) --user 65532:65532 \
	  --entrypoint /usr/local/bin/mirrorfleet --cmd --help --bin target/image/mirrorfleet:/usr/local/bin/mirrorfleet

# One file that installs the operator as config/default does (CRD, namespace, RBAC, Deployment),
# for `kubectl apply --server-side -f install.yaml`; the release attaches it. IMAGE replaces the
# operator image (the Deployment's and the one the node agents and cleanup Jobs run).
# tests/install_yaml.rs checks it holds exactly config/default's objects.
.PHONY: install-yaml
INSTALL_YAML ?= target/install.yaml
DEFAULT_IMAGE := ghcr.io/mirrorfleet/mirrorfleet:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
install-yaml: ## One install.yaml from config/default (INSTALL_YAML=target/install.yaml, IMAGE=...): what each release attaches
	mkdir -p $(dir $(INSTALL_YAML))
	{ echo "# mirrorfleet $(IMAGE): kubectl apply --server-side -f install.yaml"; \
	  echo "# Generated by \`make install-yaml\` from config/default (kubectl kustomize); do not edit."; \
	  kubectl kustomize config/default | sed 's#$(DEFAULT_IMAGE)#$(IMAGE)#g'; } > $(INSTALL_YAML).tmp
	mv $(INSTALL_YAML).tmp $(INSTALL_YAML)
	@echo "wrote $(INSTALL_YAML)"

bench: ## Benchmarks: rendering a large fleet; pulls through proxy and edge (cold, warm, edge/direct ratio); medians
	$(CARGO) bench --locked --bench render
	$(CARGO) bench --locked --bench datapath

.PHONY: bench-upstream
bench-upstream: ## Proxy + upstream sidecar, Distribution 2.8 and 3.x (MIRRORFLEET_REGISTRY_V3): pull times per upstream fault, medians of BENCH_SAMPLES (root: iptables)
	$(CARGO) test --locked --test upstream_sidecar -- --ignored --nocapture --test-threads=1 bench_pull_times

.PHONY: bench-cache
bench-cache: ## Cache keeper: eviction of a ~1.2 GiB / 8,000-blob store to the low mark (medians of 3); upstream fetches of a replayed 90-day pull sequence, expiry by last pull vs Distribution's by first caching
	$(CARGO) bench --locked --bench cache

bench-agent: ## Node agent: config change -> file, mirror death -> withdrawal (medians; root for the blackhole case)
	$(CARGO) bench --locked --bench agent
