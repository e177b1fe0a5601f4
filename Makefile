PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Real data for development (../shared/data) and where the prepared copy goes (git-ignored).
SHARED_DATA ?= ../shared/data
IXI_PREP ?= work_data/ixi_2mm
# 80x112x80 at 2 mm: the 96-voxel box of the issue clips the frontal pole of ~40% of IXI brains.
IXI_SHAPE ?= 80,112,80
# Step budget of the CPU fallback of train-ping: ~1.57 s/step at IXI_SHAPE on 2 cores, so
# preprocessing (~12 min) plus training fit in an hour.
CPU_STEPS ?= 1700
# eval-malc's model: the one train-ping wrote, else the pretrained model shipped in the package.
MODEL ?= $(if $(wildcard runs/mdregnet_ixi2mm/model/config.json),runs/mdregnet_ixi2mm/model,mdregnet/pretrained/mdregnet_ixi2mm)

.PHONY: install test lint prepare-ixi train-ping eval-malc compare ablation-mdregnet ablation-prdfe \
	ablation-fcn-ds

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

# The README's test command.
test:
	$(PY) -m pytest -q tests

lint:
	$(PY) -m pip install -q pyflakes
	$(PY) -m pyflakes mdregnet tests experiments

# Skull strip, normalise, affine-align (to the shipped MNI152 brain) and crop the IXI cohort at 2 mm.
prepare-ixi:
	$(PY) -m mdregnet.preprocess --images $(SHARED_DATA)/ixi/T1 --labels $(SHARED_DATA)/ixi/labels \
	    --out $(IXI_PREP) --shape $(IXI_SHAPE) --workers 2

# MDReg-Net with the paper's settings on PING_DIR (a preprocessed images/ folder); without it,
# the IXI training subjects at 2 mm with a reduced CPU step budget.
train-ping:
	@if [ -n "$$PING_DIR" ]; then \
	  $(PY) -m mdregnet.train --model mdregnet --lam 0.35 --lr 1e-4 --batch_size 1 --steps 150000 \
	      --data_dir "$$PING_DIR" --workdir runs/mdregnet_ping; \
	else \
	  echo "PING_DIR is not set: training on the IXI subjects of $(SHARED_DATA) at 2 mm with a"; \
	  echo "reduced CPU budget of $(CPU_STEPS) steps (the paper trains 150,000 steps on a GPU)."; \
	  $(MAKE) --no-print-directory prepare-ixi && \
	  $(PY) -m mdregnet.train --model mdregnet --lam 0.35 --lr 1e-4 --batch_size 1 \
	      --steps $(CPU_STEPS) --data_dir $(IXI_PREP) \
	      --train_subjects experiments/splits/ixi_train.txt \
	      --val_subjects experiments/splits/ixi_val.txt --val_pairs 5 --val_every 500 \
	      --checkpoint_every 250 --log_every 25 --workdir runs/mdregnet_ixi2mm; \
	fi

# The paper's evaluation: a seeded random template as fixed, every other subject moving.
eval-malc:
	@if [ -n "$$MALC_DIR" ]; then \
	  $(PY) -m mdregnet.evaluate --model $(MODEL) --data_dir "$$MALC_DIR" --template_seed 0 \
	      --out results/eval_malc; \
	else \
	  echo "MALC_DIR is not set: evaluating on the held-out IXI validation subjects."; \
	  $(MAKE) --no-print-directory prepare-ixi && \
	  $(PY) -m mdregnet.evaluate --model $(MODEL) --data_dir $(IXI_PREP) \
	      --subjects experiments/splits/ixi_val.txt --template_seed 0 --out results/eval_ixi_val; \
	fi

# The comparison table of the README: affine only, ANTs SyN (pip install -e '.[compare]') and the
# shipped models, with and without test-time refinement, on the IXI validation pairs.
compare: prepare-ixi
	$(PY) experiments/compare.py --data_dir $(IXI_PREP) --subjects experiments/splits/ixi_val.txt \
	    --template_seed 0 --refine_steps 0,20 --out results/compare

# The ablations the papers report, each one command writing experiments/results/ablation_<name>.md
# and .json, with CPU-sized defaults (each script's --help gives the flags of the paper's protocol).
# MDReg-Net: lambda sweep (Fig. 2), smoothing layer and direction (Table 3), on the prepared IXI
# (the script says to run `make prepare-ixi` when work_data/ixi_2mm is missing).
ablation-mdregnet:
	$(PY) experiments/ablation_mdregnet.py --data_dir $(IXI_PREP)

# PRDFE Table I: VoxelMorph, PDFE, IPRDFE, PRDFE on 2D slices warped by known deformations.
ablation-prdfe:
	$(PY) experiments/ablation_prdfe_2d.py --slices_dir $(SHARED_DATA)/slices2d

# Li & Fan Fig. 2: with/without pooling and the coarse-grained FCN, hippocampus boxes of IXI.
ablation-fcn-ds:
	$(PY) experiments/ablation_fcn_ds.py --data_dir $(IXI_PREP)

# Speed and memory of every model at 176x192x176, 160x192x224 and 80x112x80, side by side with
# ANTs SyN and VoxelMorph-torch on the same pair (experiments/benchmark.py; writes
# experiments/results/benchmark_{cpu,gpu}.{md,json}). PEER_PYTHON: an interpreter with antspyx
# and/or torch + voxelmorph (e.g. a separate venv); a peer it cannot import is reported as
# "not installed".
PEER_PYTHON ?= $(PY)
.PHONY: benchmark
benchmark:
	$(PY) experiments/benchmark.py --peer_python $(PEER_PYTHON)

# Cohort-mode throughput (#8) with the shipped model on the prepared IXI cohort at 2 mm, atlas
# propagation and registration to a template, batch sizes 1, 2 and 4 (writes
# experiments/results/benchmark_cohort_ixi_{atlas,to_template}.{md,json}).
.PHONY: benchmark-cohort
benchmark-cohort:
	@test -d $(IXI_PREP)/images || { echo "$(IXI_PREP) is missing: run 'make prepare-ixi' first"; exit 1; }
	for mode in atlas to_template; do \
	  $(PY) experiments/benchmark_cohort.py --images $(IXI_PREP)/images --labels $(IXI_PREP)/labels \
	      --n 19 --batch_sizes 1,2,4 --mode $$mode \
	      --out experiments/results/benchmark_cohort_ixi_$$mode.json || exit 1; \
	done
