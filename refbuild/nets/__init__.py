"""The networks the reference library runs, each with its weight reader and preprocessing:
MTCNN (`mtcnn.py`, facenet-pytorch's weights), VGGFace (`vggface.py`, vgg_face_dag.pth) and the
face recogniser (`dlib_resnet.py`, dlib's ResNet read by `dlib_serial.py`; chips: `chips.py`).

Nothing is imported here: each module imports torch only when it is itself imported.
"""
