"""Models that misbehave, for the bad-input tests (named as `tests.odd_models:function`)."""

from torch import nn

from pipeline.models import TeacherNet


def feature_map_teacher(num_classes=4, in_channels=1):
    """Returns an (N, C, H, W) map, not logits."""
    return nn.Conv2d(in_channels, num_classes, 3, padding=1)


def raising_model(num_classes=4):
    raise ValueError("no such width")


def ten_class_student(in_channels=1):
    """Ignores num_classes: always 10 outputs."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(10))


class _Pair(nn.Module):
    def forward(self, x):
        return x.mean((2, 3)), x


def tuple_student():
    return _Pair()


class _WithIdleHead(nn.Module):
    """Has a module (`aux`) that forward never calls, as an auxiliary head unused in eval mode."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        self.aux = nn.Linear(num_classes, num_classes)

    def forward(self, x):
        return self.body(x)


def idle_head_model(num_classes=4, in_channels=1):
    return _WithIdleHead(num_classes, in_channels)


class _Loud(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        return self.fc(x) * 1e6 + 1e6  # past float16's 65504


def loud_model(num_classes=4, in_channels=1):
    return _Loud(num_classes, in_channels)


class _NoTensorHead(nn.Module):
    """`meta` returns a dict, not a tensor: nothing to cache or match."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        self.meta = _Describe()

    def forward(self, x):
        self.meta(x)
        return self.body(x)


class _Describe(nn.Module):
    def forward(self, x):
        return {"shape": tuple(x.shape)}


def no_tensor_model(num_classes=4, in_channels=1):
    return _NoTensorHead(num_classes, in_channels)


class _SharedAct(nn.Module):
    """One ReLU (`act`) called twice per forward, as torchvision's BasicBlock does: its output is ambiguous."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.act(self.conv1(x)))))


def shared_act_model(num_classes=4, in_channels=1):
    return _SharedAct(num_classes, in_channels)


def bn_head_student(num_classes=4, in_channels=1, image_size=16):
    """BatchNorm on a 1x1 map after pooling (as a torchvision ResNet's last stage on small images): it cannot train
    on a batch of one sample."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8),
                         nn.Flatten(), nn.Linear(8, num_classes))


class _LoudTeacher(TeacherNet):
    """The default teacher's architecture and weights, another forward: a cache of it is another cache."""

    def forward(self, x):
        return super().forward(x) * 10


def loud_teacher(num_classes=4, in_channels=1, image_size=16):
    return _LoudTeacher(num_classes=num_classes, in_channels=in_channels)


def dropout_student(num_classes=4, in_channels=1, image_size=16):
    """Random in training: resuming it reproduces a run only if the RNG state is resumed too."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 32), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(32, num_classes))


class _MapAndVector(nn.Module):
    def forward(self, x):
        return x, x.mean((2, 3))


class _TupleLayerTeacher(nn.Module):
    """Its `split` module returns (map, vector), as attention modules and some blocks return tuples."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv, self.split, self.fc = nn.Conv2d(in_channels, 4, 3, padding=1), _MapAndVector(), nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.split(self.conv(x))[1])


def tuple_layer_teacher(num_classes=4, in_channels=1):
    return _TupleLayerTeacher(num_classes, in_channels)


def weightless_model(num_classes=4, in_channels=1):
    """Returns class scores of the right shape but has no parameters: nothing to train."""
    return nn.Sequential(nn.Conv2d(in_channels, 1, 1).requires_grad_(False), nn.AdaptiveAvgPool2d((1, num_classes)),
                         nn.Flatten())


class _Detached(nn.Module):
    """Has weights, but its forward cuts them out of the graph: no loss can reach them."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        return self.fc(x).detach()


def detached_student(num_classes=4, in_channels=1):
    return _Detached(num_classes, in_channels)


class _SequenceFirst(nn.Module):
    """(n, c, h, w) -> (h*w, n, c): positions first, as torch's transformer layers give without batch_first."""

    def forward(self, x):
        return x.flatten(2).permute(2, 0, 1)


class _SequenceFirstNet(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv, self.seq, self.fc = nn.Conv2d(in_channels, 8, 4, stride=4), _SequenceFirst(), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.seq(self.conv(x)).mean(0))


def sequence_first_student(num_classes=4, in_channels=1):
    return _SequenceFirstNet(num_classes, in_channels)


class _AuxInTraining(nn.Module):
    """Class scores in eval mode, (scores, auxiliary scores) in training mode, as torchvision's GoogLeNet."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc, self.aux = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes)), nn.Linear(num_classes, num_classes)

    def forward(self, x):
        y = self.fc(x)
        return (y, self.aux(y)) if self.training else y


def aux_in_training_student(num_classes=4, in_channels=1):
    return _AuxInTraining(num_classes, in_channels)


class _LazyInTraining(nn.Module):
    """A lazy BatchNorm that only the training-mode forward runs: its buffers are made at the first training step."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc, self.bn = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes)), nn.LazyBatchNorm1d()

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y) if self.training else y


def lazy_in_training_student(num_classes=4, in_channels=1):
    return _LazyInTraining(num_classes, in_channels)
