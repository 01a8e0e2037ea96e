"""Names that several stages share, spelled once: a stage that writes a tag and one that reads it
(or searches for it) cannot drift apart. The values are what runs already carry: never change one."""

SOURCE_RUN_TAG = "fer.source_run"  # on an evaluation (and a prediction): the training run of its model
TRAINED_ON_DEMO_TAG = "fer.trained_on_demo"  # on an evaluation: the model was trained on demo data
PREDICT_EXPERIMENT = "fer-predictions"  # predict's and score's runs, unless the user chose one
EVALUATED_SPLITS = ("test", "val")  # what evaluate scores and promote compares

# Tags that one stage writes and another reads or searches for.
STAGE_TAG = "fer.stage"  # the stage that made a run: clean, train, evaluate, ...
MODEL_TAG = "fer.model"  # a run's model name (cnn, resnet50, ensemble, ...)
MODEL_FAMILY_TAG = "fer.model_family"  # cnn or resnet: which candidates promote compares
MODEL_URI_TAG = "fer.model_uri"  # the model a run logged or used
MODEL_VERSION_TAG = "fer.model_version"  # the registered version a run used
SERVED_MODEL_URI_TAG = "fer.served_model_uri"  # on an evaluation: the model as scored (settings and all)
SETTINGS_TAG = "fer.settings"  # on an evaluation: the views it predicted with
DATA_TAG = "fer.data"  # the data a run read, as the user named it
DATA_URI_TAG = "fer.data_uri"  # the data a run read, as a URI another stage can read again
DATA_DIGEST_TAG = "fer.data_digest"  # the digest of the images a run read
DEMO_TAG = "fer.demo_data"  # "true" on runs whose data is (cleaned from) the built-in demo
TRAIN_DATA_TAG = "fer.train_data"  # on an evaluation: its model's training data
TRAIN_DATA_DIGEST_TAG = "fer.train_data_digest"  # on an evaluation: the digest of that data
SPLIT_TAG = "fer.split"  # on an evaluation: the split scored (test or val)
TEST_DIGEST_TAG = "fer.test_digest"  # on an evaluation: the digest of the images scored
REGISTERED_MODEL_TAG = "fer.registered_model"  # on a promote run: the registered model it decided for
CHAMPION_CHANGED_TAG = "fer.champion_changed"  # on a promote run: whether the champion moved
