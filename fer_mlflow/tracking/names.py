"""Names that several stages share, spelled once: a stage that writes a tag and one that reads it
(or searches for it) cannot drift apart. The values are what runs already carry: never change one."""

SOURCE_RUN_TAG = "fer.source_run"  # on an evaluation (and a prediction): the training run of its model
TRAINED_ON_DEMO_TAG = "fer.trained_on_demo"  # on an evaluation: the model was trained on demo data
PREDICT_EXPERIMENT = "fer-predictions"  # predict's and score's runs, unless the user chose one
EVALUATED_SPLITS = ("test", "val")  # what evaluate scores and promote compares
