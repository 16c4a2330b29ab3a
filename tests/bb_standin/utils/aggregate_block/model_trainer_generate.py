"""Stand-in model factory: the PreAct-ResNets the test records hold (models/preact_resnet.py, copied in by the test)."""
from models import preact_resnet


def generate_cls_model(model_name, num_classes=10, image_size=32, **kwargs):
    return getattr(preact_resnet, model_name)(num_classes=num_classes)
