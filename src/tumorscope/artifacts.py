"""File names of the artefacts the stages hand each other (folders come from params.yaml)."""

MODEL_FILE = "model.keras"          # train.model_dir/: the native Keras model
TRAIN_REPORT = "train.json"         # train.model_dir/: run id, model URI, input spec, scores
TRAIN_HISTORY = "history.tsv"       # train.model_dir/: per-epoch metrics (DVC plots)
RETRAIN_DIR = ".retrain"  # in the project: champions saved for a retraining to start from (train.init_weights)
TRAIN_BACKUP_DIR = ".train-backup"  # in the project: the train stage's last finished epoch (a killed run resumes)
EVALUATION_REPORT = "report.json"   # evaluate.out_dir/: test scores and accuracy by distance
SPEC_FILE = "input_spec.json"       # beside a Bento's model: classes, preprocessing, DICOM window
TRUST_FILE = "trust.json"  # the trust state (calibration, conformal thresholds, OOD check) beside it
