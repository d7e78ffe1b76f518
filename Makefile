# The README's two commands: `make demo` and `make test`. Both set everything up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint shaders prebuilt bench clean wheel sanitize

install:
	./scripts/setup.sh

demo: install
	$(VENV)/bin/aule-kp demo

# The wheel is built first (cached by its inputs' hash) so that tests/test_wheel.py installs it into a
# fresh venv with numpy 2 and runs the Vulkan tests from outside the tree.
test: install lint wheel
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check aule_kp tests benchmarks examples comfyui_aule

# Kernels that need glslang >= 15.2 are copied from glsl/prebuilt/ (hash-checked) unless AULE_KP_GLSLANG
# names one (or `glslang` on PATH is one): then they are rebuilt there too. `make prebuilt` fetches it.
shaders: install
	$(PY) -m aule_kp.vulkan.compile --force

# Not after `install`: a header changed under a prebuilt kernel fails install's check until this rebuilds it.
prebuilt:
	AULE_KP_GLSLANG=$(CURDIR)/scripts/glslang15.sh ./scripts/setup.sh
	AULE_KP_GLSLANG=$(CURDIR)/scripts/glslang15.sh $(PY) -m aule_kp.vulkan.compile --force

# The CPU kernels' tests against AddressSanitizer + UndefinedBehaviorSanitizer builds of them (GCC; ~1 min).
sanitize: install
	./scripts/cpu_sanitize.sh

bench: install
	$(VENV)/bin/aule-kp bench --vs

# dist/aule_kp-*.whl: the patched kp (private, aule_kp._kp) and every SPIR-V kernel inside; its own build venv.
wheel:
	./scripts/build_wheel.sh

clean:
	rm -rf build spirv_cache dist
